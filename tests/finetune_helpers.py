"""Helpers for the fine-tuning tests: a SmallCNN bundle with a trainable head, variants of it that
know fewer classes, and real Fashion-MNIST images written as labelled image folders."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.runtime.bundle import read_bundle, write_bundle
from edgesmith.runtime.finetune.head import load_head

REPO = Path(__file__).resolve().parents[1]
FMNIST = "/usr/share/datasets/fashion-mnist"

HEAD_RECIPE = f"""\
version: 1
name: fmnist-head
model:
  factory: {REPO}/examples/fashion_mnist/model.py:SmallCNN
  weights: {REPO}/examples/fashion_mnist/weights.safetensors
  input: {{shape: [1, 1, 28, 28], dtype: float32}}
data:
  kind: fashion-mnist
  calibration: 64
  eval: 1000
target: x86-cpu
export: [onnx]
trainable_head: {{module: classifier.4, policy: keep}}
"""


def build_head_bundle(out: Path, module: str = "classifier.4") -> Path:
    """Build the SmallCNN recipe with ``trainable_head`` (about 10 s); return the bundle folder.

    ``module: classifier.4`` gives a linear head on 64 features, ``classifier`` the two-layer
    MLP head on the 3,136 features of the convolutions (the issue-14 case)."""
    import json

    from edgesmith.pipeline import build
    from edgesmith.recipe import load_recipe

    out.parent.mkdir(parents=True, exist_ok=True)
    recipe_path = out.parent / "recipe-head.yaml"
    recipe_path.write_text(HEAD_RECIPE.replace("module: classifier.4", f"module: {module}"))
    build(load_recipe(recipe_path), out, bundle_version=1)
    report = json.loads((out / "report.json").read_text())
    return out / report["artifacts"][0]["bundle"]


@functools.cache
def fmnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    from edgesmith.data import read_fashion_mnist

    return read_fashion_mnist(FMNIST, split)


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def restrict_classes(
    src: Path,
    out: Path,
    classes: int,
    *,
    version: int | None = None,
    sign_key: Any = None,
    policy: str | None = None,
) -> Path:
    """A copy of a head bundle whose head knows only the first ``classes`` classes."""
    if out.exists():
        return out
    m = read_bundle(src)
    assert m.trainable_head is not None
    head = load_head(src, m.trainable_head)
    last = head.linear_indices()[-1]
    for k in (f"layers.{last}.weight", f"layers.{last}.bias"):
        head.params[k] = head.params[k][:classes]
    head.layers[last] = head.layers[last].model_copy(update={"out_features": classes})
    work = out.parent / f".{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    head.save(work / "head.npz")
    with np.load(src / "golden.npz", allow_pickle=False) as z:
        np.savez(work / "golden.npz", inputs=z["inputs"], outputs=z["outputs"][:, :classes])
    doc = m.to_json()
    for k in ("schema", "files", "created"):
        doc.pop(k)
    doc["version"] = version or m.version
    doc["labels"] = list(m.labels or [])[:classes]
    doc["outputs"] = [{"name": "logits", "shape": ["batch", classes], "dtype": "float32"}]
    doc["trainable_head"] = head.spec(
        m.trainable_head["feature_output"],
        policy=policy or m.trainable_head["policy"],
        trained=m.trainable_head["trained"],
    )
    files = {rel: src / rel for rel in m.files}
    files["head.npz"] = work / "head.npz"
    files["golden.npz"] = work / "golden.npz"
    write_bundle(out, doc, files, sign_key=sign_key)
    return out


def reversion(src: Path, out: Path, version: int, sign_key: Any = None, **fields: Any) -> Path:
    """The same bundle with another version (and manifest fields), signed with ``sign_key``."""
    if out.exists():
        return out
    m = read_bundle(src)
    doc = m.to_json()
    for k in ("schema", "files", "created"):
        doc.pop(k)
    doc["version"] = version
    for k, v in fields.items():
        if k == "policy":
            doc["trainable_head"]["policy"] = v
        else:
            doc[k] = v
    write_bundle(out, doc, {rel: src / rel for rel in m.files}, sign_key=sign_key)
    return out


def write_images(root: Path, x: np.ndarray, names: list[str] | np.ndarray) -> Path:
    """Write uint8 images as ``root/<slug(name)>/<i>.png``."""
    from PIL import Image

    for i, (img, name) in enumerate(zip(x, names, strict=True)):
        d = root / slug(str(name))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")
    return root


def image_folder(root: Path, labels: list[str], train: range, val: range | None = None) -> Path:
    """Fashion-MNIST training images ``train`` (and ``val``) as a labelled image folder."""
    x, y = fmnist("train")
    names = [labels[i] for i in y]
    if val is None:
        return write_images(root, x[train], [names[i] for i in train])
    write_images(root / "train", x[train], [names[i] for i in train])
    write_images(root / "val", x[val], [names[i] for i in val])
    return root


@functools.cache
def digits28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real handwritten digits (8x8, 17 gray levels) as 28x28 uint8 images
    laid out like MNIST (the digit scaled to 20x20, centred), and their labels 0-9."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for im in d.images:
        a = Image.fromarray((im / 16.0 * 255).astype(np.uint8)).resize((20, 20), Image.BILINEAR)
        out.append(np.pad(np.asarray(a), 4))
    return np.stack(out), np.asarray(d.target)
