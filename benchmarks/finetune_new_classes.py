"""New classes on the device without forgetting the old ones (issue 14), on real data the model
never saw, against plain fine-tuning, replay only, replay + distillation, and joint training.

Scenarios (each over ``--seeds`` seeds; the model: a Fashion-MNIST bundle with a trainable head):

* ``digits``: the ten classes of scikit-learn's real handwritten digits (1,797 8x8 images, laid out
  like MNIST in 28x28) added at once; ~125 training and ~55 held-out images per digit.
* ``faces``: two classes, faces and non-faces, from scikit-image's ``lfw_subset`` (200 real 25x25
  photos, resized to 28x28); 70 training and 30 held-out images per class.
* ``incremental``: the ten digits one class at a time (ten device runs, each a new bundle
  version); the device keeps its own classes in a replay buffer (``--replay``, 200 features per
  class); old = the build's classes, measured after every step.

Methods (all in numpy on the bundle's backbone features, through ``edgesmith.runtime.finetune``):

* ``plain``: fine-tune the whole head, nothing kept (the issue's report).
* ``replay``: plus the bundle's shipped exemplars (and the device's replay buffer) as training data.
* ``replay_lwf``: plus distillation from the current head and weight aligning (iCaRL/LwF/WA-style,
  the whole head trains).
* ``default``: what ``edgesmith finetune --add-classes`` does by default: the old classes' part of
  the head frozen, new hidden units for the new classes, shipped exemplars as negatives, weight
  aligning.
* ``joint`` (reference): the head trained on the new data plus 6,000 Fashion-MNIST training
  images at once (what a device cannot do: it does not have the old data).

Accuracy: old classes on the 10,000 Fashion-MNIST test images (20-way argmax; the bundle before
fine-tuning is the baseline), new classes on their held-out images, all classes as the mean over
classes. Also ``edgesmith finetune BUNDLE --data DIGITS --add-classes -o NEW --json`` in its own
process: wall time, peak RSS (``VmHWM``), whether torch was imported; and the memory's size.

Run:
    .venv/bin/python benchmarks/finetune_new_classes.py [--bundle BUNDLE] [--seeds 3]

Without ``--bundle`` the reference model (examples/fashion_mnist/recipe.yaml with
``trainable_head: {module: classifier}``) is built once into ``benchmarks/.cache/`` (prune,
distill, int8: slow on 2 cores) and its ONNX int8 bundle is used. Writes
benchmarks/results/finetune_new_classes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results"
FMNIST = "/usr/share/datasets/fashion-mnist"
METHODS = ("plain", "replay", "replay_lwf", "default", "joint")


def default_bundle() -> Path:
    out = CACHE / "fmnist-head"
    if not (out / "report.json").exists():
        import yaml

        from edgesmith.pipeline import build
        from edgesmith.recipe import parse_recipe

        src = ROOT / "examples/fashion_mnist/recipe.yaml"
        doc = yaml.safe_load(src.read_text())
        doc["trainable_head"] = {"module": "classifier"}
        print("building the reference recipe with trainable_head (once) ...", flush=True)
        build(parse_recipe(doc, src.parent), out, force=True, bundle_version=1)
    report = json.loads((out / "report.json").read_text())
    arts = report["artifacts"]
    pick = next((a for a in arts if a["format"] == "onnx" and a["precision"] != "fp32"), arts[0])
    return out / pick["bundle"]


def attach_memory(bundle: Path, out: Path) -> Path:
    """A copy of a bundle built before memories existed, with the memory a build now ships
    (the recipe defaults; herding on this bundle's exported backbone instead of the PyTorch one,
    the only difference). Unsigned: for measuring only."""
    if out.exists():
        return out
    from types import SimpleNamespace

    from edgesmith.data import read_fashion_mnist
    from edgesmith.exemplars import prepare_memory, write_memory
    from edgesmith.recipe import HeadMemoryConfig
    from edgesmith.runtime import load
    from edgesmith.runtime.bundle import derived_manifest, read_bundle, write_bundle
    from edgesmith.runtime.finetune.memory import MEMORY_FILE
    from edgesmith.runtime.specs import preprocess_images

    model = load(bundle)
    m = read_bundle(bundle)
    spec = model.inputs[0]

    def dataset(split: str) -> list[tuple[np.ndarray, int]]:
        x, y = read_fashion_mnist(FMNIST, split)
        inputs = preprocess_images(x, m.preprocess, spec)
        return list(zip(inputs, y.tolist(), strict=True))

    data = SimpleNamespace(train=dataset("train"), eval=dataset("test"), labels=m.labels)
    pm = prepare_memory(model.features, data, HeadMemoryConfig(), model.head.feature_size)
    assert pm is not None
    work = out.parent / f".{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)

    class Backbone:  # the bundle's backbone as build() sees an exported file: features out
        inputs = model.inputs

        def __call__(self, x: np.ndarray) -> np.ndarray:
            return model.features(x)

    mem = write_memory(pm, Backbone(), model.head, work / MEMORY_FILE)
    doc = derived_manifest(m, trainable_head={**(m.trainable_head or {}), "memory": mem})
    files = {rel: bundle / rel for rel in m.files}
    files[MEMORY_FILE] = work / MEMORY_FILE
    write_bundle(out, doc, files)
    return out


# --------------------------------------------------------------------------- data


def digits28() -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for im in d.images:
        a = Image.fromarray((im / 16.0 * 255).astype(np.uint8)).resize((20, 20), Image.BILINEAR)
        out.append(np.pad(np.asarray(a), 4))
    return np.stack(out), np.asarray([f"digit-{t}" for t in d.target])


def faces28() -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from skimage.data import lfw_subset

    x = lfw_subset()  # 100 faces, then 100 non-faces, float in [0, 1]
    imgs = [
        np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((28, 28), Image.BILINEAR))
        for a in x
    ]
    return np.stack(imgs), np.asarray(["face"] * 100 + ["not-face"] * 100)


def split(names: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for n in np.unique(names):
        idx = rng.permutation(np.flatnonzero(names == n))
        k = round(fraction * len(idx))
        va += idx[:k].tolist()
        tr += idx[k:].tolist()
    return np.asarray(sorted(tr)), np.asarray(sorted(va))


# --------------------------------------------------------------------------- methods


def method_config(method: str, epochs: int, seed: int) -> tuple[dict[str, Any], bool]:
    """FinetuneConfig fields and whether the shipped exemplars are replayed."""
    base = {"epochs": epochs, "seed": seed}
    if method == "plain":
        return {**base, "isolate": False, "distill": 0.0, "align": False}, False
    if method == "replay":
        return {**base, "isolate": False, "distill": 0.0, "align": False}, True
    if method == "replay_lwf":
        return {**base, "isolate": False, "distill": 2.0, "align": True}, True
    return base, True  # default


def accuracies(
    head: Any,
    labels: list[str],
    f_old: np.ndarray,
    y_old: np.ndarray,
    f_new: np.ndarray,
    n_new: np.ndarray,
) -> dict[str, float]:
    from edgesmith.runtime.finetune.memory import label_accuracy

    old_names = np.asarray([labels[i] for i in y_old])
    old = label_accuracy(head, labels, f_old, old_names)
    new = label_accuracy(head, labels, f_new, n_new) if len(n_new) else float("nan")
    per_class = []
    for names, f in ((old_names, f_old), (n_new, f_new)):
        for c in np.unique(names):
            per_class.append(label_accuracy(head, labels, f[names == c], names[names == c]))
    return {"old": old, "new": new, "all": float(np.mean(per_class))}


class Setup:
    """Features of everything through the bundle's backbone, computed once."""

    def __init__(self, bundle: Path, cache: Path) -> None:
        from edgesmith.data import read_fashion_mnist
        from edgesmith.runtime import load
        from edgesmith.runtime.finetune import FeatureCache
        from edgesmith.runtime.finetune.memory import load_memory

        self.model = load(bundle)
        assert self.model.manifest is not None
        self.labels = list(self.model.labels or [])
        self.head = self.model.head
        fc = FeatureCache(cache)
        xe, self.ye = read_fashion_mnist(FMNIST, "test")
        xt, yt = read_fashion_mnist(FMNIST, "train")
        self.fe = fc.features(self.model, xe, description="fashion test")
        self.fj = fc.features(self.model, xt[:6000], description="fashion train (joint)")
        self.yj = yt[:6000]
        xd, self.nd = digits28()
        self.fd = fc.features(self.model, xd, description="digits")
        self.xd = xd
        xf, self.nf = faces28()
        self.ff = fc.features(self.model, xf, description="faces")
        self.memory = load_memory(bundle, self.model.manifest.trainable_head)
        if self.memory is None:
            raise SystemExit(f"{bundle} ships no memory: rebuild it with this version")
        ex = self.memory.features(self.model, "exemplars", fc)
        self.ex = (ex, np.asarray([self.labels.index(n) for n in self.memory.names("exemplars")]))
        fc.save()
        self.before_old = float((self.head(self.fe).argmax(1) == self.ye).mean())


def learn(
    s: Setup,
    head: Any,
    labels: list[str],
    f: np.ndarray,
    names: np.ndarray,
    fv: np.ndarray,
    nv: np.ndarray,
    method: str,
    epochs: int,
    seed: int,
    replay: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Any, list[str]]:
    """One device run: ``fit_head`` as ``finetune_model`` calls it (or the joint reference)."""
    from edgesmith.runtime.finetune import encode_labels, fit_head
    from edgesmith.runtime.finetune.training import FinetuneConfig

    y, labels = encode_labels(names, labels, add_classes=True)
    yv, labels = encode_labels(nv, labels, add_classes=True)
    if method == "joint":
        cfg = FinetuneConfig(epochs=epochs, seed=seed, isolate=False, distill=0.0, align=False)
        fit = fit_head(
            head, len(labels), np.concatenate([f, s.fj]), np.concatenate([y, s.yj]), (fv, yv), cfg
        )
        return fit.head, labels
    fields, use_memory = method_config(method, epochs, seed)
    parts = [s.ex] if use_memory else []
    if replay is not None and len(replay[1]) and method != "plain":
        parts.append(replay)
    old = (
        (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        if parts
        else None
    )
    fit = fit_head(head, len(labels), f, y, (fv, yv), FinetuneConfig(**fields), old=old)
    return fit.head, labels


def at_once(s: Setup, scenario: str, seeds: int, epochs: int) -> dict[str, Any]:
    f_all, n_all = (s.fd, s.nd) if scenario == "digits" else (s.ff, s.nf)
    out: dict[str, Any] = {m: [] for m in METHODS}
    for seed in range(seeds):
        tr, va = split(n_all, 0.3, seed)
        for method in METHODS:
            head, labels = learn(
                s,
                s.head,
                s.labels,
                f_all[tr],
                n_all[tr],
                f_all[va],
                n_all[va],
                method,
                epochs,
                seed,
            )
            acc = accuracies(head, labels, s.fe, s.ye, f_all[va], n_all[va])
            out[method].append(acc)
            print(
                f"{scenario} seed {seed} {method:10s} old {acc['old']:.4f} new {acc['new']:.4f} all {acc['all']:.4f}",
                flush=True,
            )
    return out


def incremental(s: Setup, seeds: int, epochs: int, per_class: int = 200) -> dict[str, Any]:
    from edgesmith.runtime.finetune.incremental import ReplayBuffer

    out: dict[str, Any] = {m: [] for m in METHODS}
    for seed in range(seeds):
        tr, va = split(s.nd, 0.3, seed)
        order = np.random.default_rng(seed).permutation(10)
        for method in METHODS:
            head, labels = s.head, list(s.labels)
            buf = ReplayBuffer(capacity=per_class * 10, seed=seed)
            curve = []
            seen: list[str] = []
            for step, d in enumerate(order.tolist()):
                name = f"digit-{d}"
                seen.append(name)
                t_ix = tr[s.nd[tr] == name]
                v_ix = va[s.nd[va] == name]
                if method == "joint":  # the reference: all ten at once, at the end only
                    if step < 9:
                        continue
                    t_ix = tr[np.isin(s.nd[tr], seen)]
                    v_ix = va[np.isin(s.nd[va], seen)]
                replay = buf.arrays("bench", [*labels, name]) if len(buf) else None
                head, labels = learn(
                    s, s.head if method == "joint" else head, s.labels if method == "joint" else labels,
                    s.fd[t_ix], s.nd[t_ix], s.fd[v_ix], s.nd[v_ix], method, epochs, seed + step, replay,
                )  # fmt: skip
                if method != "plain":
                    yi = np.asarray([labels.index(n) for n in s.nd[t_ix]])
                    buf.add(s.fd[t_ix], yi, "bench", labels)
                seen_va = va[np.isin(s.nd[va], seen)]
                acc = accuracies(head, labels, s.fe, s.ye, s.fd[seen_va], s.nd[seen_va])
                curve.append(acc)
            out[method].append(curve)
            last = curve[-1]
            print(
                f"incremental seed {seed} {method:10s} old {last['old']:.4f} new {last['new']:.4f} all {last['all']:.4f}",
                flush=True,
            )
    return out


# --------------------------------------------------------------------------- the CLI, isolated

_RUNNER = """
import json, sys, time
t0 = time.perf_counter()
from edgesmith.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code or 0
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("BENCH " + json.dumps({"code": code, "wall_s": time.perf_counter() - t0,
      "peak_rss_mb": hwm / 1024, "torch_imported": "torch" in sys.modules}), flush=True)
"""


def cli_run(s: Setup, bundle: Path, epochs: int) -> dict[str, Any]:
    from PIL import Image

    tr, va = split(s.nd, 0.3, 0)
    with tempfile.TemporaryDirectory(prefix="finetune-new-") as tmp:
        data = Path(tmp) / "digits"
        for part, ix in (("train", tr), ("val", va)):
            for i in ix.tolist():
                d = data / part / str(s.nd[i])
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(s.xd[i]).save(d / f"{i:04d}.png")
        out = Path(tmp) / "v2"
        cmd = [
            sys.executable, "-c", _RUNNER, "-q", "finetune", str(bundle), "--data", str(data),
            "--add-classes", "-o", str(out), "--json", "--epochs", str(epochs),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=3600, check=False, env=env
        )
        if "BENCH " not in proc.stdout:
            raise SystemExit(f"finetune CLI failed:\n{proc.stderr[-3000:]}")
        bench = json.loads(proc.stdout.split("BENCH ", 1)[1])
        doc = json.loads(proc.stdout.split("BENCH ", 1)[0])
        from edgesmith.runtime import load

        new = load(out)
        fashion_after = float((new.head(s.fe).argmax(1) == s.ye).mean())
    return {
        "command": "edgesmith finetune BUNDLE --data DIGITS --add-classes -o OUT --json",
        "images": len(tr) + len(va),
        "exit_code": bench["code"],
        "wall_s": bench["wall_s"],
        "peak_rss_mb": bench["peak_rss_mb"],
        "torch_imported": bench["torch_imported"],
        "classes": doc["metrics"]["classes"],
        "old_class_check": doc["metrics"].get("old_class_check"),
        "fashion_test_accuracy": {"before": s.before_old, "after": fashion_after},
    }


def summarize(runs: list[dict[str, float]]) -> dict[str, list[float]]:
    return {
        k: [float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs]))]
        for k in ("old", "new", "all")
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--scenarios", default="digits,faces,incremental,cli")
    ap.add_argument("--out", type=Path, default=RESULTS / "finetune_new_classes.json")
    args = ap.parse_args()
    from edgesmith.progress import set_quiet

    bundle = args.bundle or default_bundle()
    from edgesmith.runtime.bundle import read_bundle as _read

    if not (_read(bundle).trainable_head or {}).get("memory"):
        bundle = attach_memory(bundle, CACHE / f"{bundle.name}-memory")
        print(f"added the memory a build now ships: {bundle}", flush=True)
    set_quiet(True)
    t0 = time.time()
    s = Setup(bundle, CACHE / "features-new-classes")
    from edgesmith.runtime.bundle import read_bundle

    m = read_bundle(bundle)
    files = {rel: e.size for rel, e in m.files.items()}
    mem = m.trainable_head["memory"]
    doc: dict[str, Any] = {
        "bundle": str(bundle),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "bundle_bytes": sum(files.values()),
        "files": files,
        "memory": {**mem, "share_of_bundle": mem["bytes"] / sum(files.values())},
        "before_old_accuracy": s.before_old,
        "seeds": args.seeds,
        "scenarios": {},
    }
    scen = args.scenarios.split(",")
    for name in ("digits", "faces"):
        if name in scen:
            runs = at_once(s, name, args.seeds, args.epochs)
            doc["scenarios"][name] = {
                "runs": runs,
                "summary": {k: summarize(v) for k, v in runs.items()},
            }
    if "incremental" in scen:
        runs = incremental(s, args.seeds, args.epochs)
        doc["scenarios"]["incremental"] = {
            "runs": runs,
            "summary": {k: summarize([c[-1] for c in v]) for k, v in runs.items()},
        }
    if "cli" in scen:
        doc["cli"] = cli_run(s, bundle, args.epochs)
    doc["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(
        f"\nbundle {bundle} ({doc['bundle_bytes']} bytes), memory {mem['bytes']} bytes "
        f"({100 * doc['memory']['share_of_bundle']:.1f}%); old-class accuracy before {s.before_old:.4f}"
    )
    for name, sc in doc["scenarios"].items():
        print(f"\n{name}: mean ± sd over {args.seeds} seeds (old = Fashion-MNIST test, 20-way)")
        print("| method | old | Δ old (pt) | new | all |\n|---|---:|---:|---:|---:|")
        for meth, sm in sc["summary"].items():
            print(
                f"| {meth} | {sm['old'][0]:.4f} ± {sm['old'][1]:.4f} | {100 * (sm['old'][0] - s.before_old):+.2f} | "
                f"{sm['new'][0]:.4f} ± {sm['new'][1]:.4f} | {sm['all'][0]:.4f} ± {sm['all'][1]:.4f} |"
            )
    if "cli" in doc:
        c = doc["cli"]
        print(
            f"\nCLI: {c['wall_s']:.1f} s, peak RSS {c['peak_rss_mb']:.0f} MB, torch imported: {c['torch_imported']}, "
            f"fashion test {c['fashion_test_accuracy']['before']:.4f} -> {c['fashion_test_accuracy']['after']:.4f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
