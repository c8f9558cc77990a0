"""Build side of a bundle's memory of its classes (runtime/memory.py, docs/finetune.md).

``build`` with ``trainable_head`` ships, next to the head, a few samples per class: exemplars
chosen by herding among training samples (what fine-tuning on the device replays) and held-out
samples from the evaluation data (what the held-out gate and the OTA health check measure the
old classes on). :func:`prepare_memory` selects them once with the PyTorch backbone;
:func:`write_memory` writes one bundle's ``memory.npz`` with that bundle's exported backbone
(features, when stored as such, and the reference accuracy depend on it).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.runtime.finetune.head import flatten_features
from edgesmith.runtime.finetune.memory import (
    MEMORY_FILE,
    MemorySpec,
    decode_samples,
    herding,
    memory_bytes,
)

__all__ = ["PreparedMemory", "prepare_memory", "write_memory"]

log = logging.getLogger(__name__)

BATCH = 256


@dataclass
class PreparedMemory:
    """Selected samples (model inputs, float32) with class indices, and how to store them."""

    form: str
    exemplars: np.ndarray
    exemplar_labels: np.ndarray
    holdout: np.ndarray
    holdout_labels: np.ndarray
    class_names: list[str]
    exemplars_per_class: int
    holdout_per_class: int
    budget: float


def _class_pool(
    dataset: Any, per_class: int, seed: int, classes: int = 0
) -> tuple[np.ndarray, np.ndarray] | None:
    """Up to ``per_class`` random samples of every class: (inputs, integer targets).

    With ``classes`` (the number of labels) the scan stops once every class is full."""
    import torch

    rng = np.random.default_rng(seed)
    xs: list[np.ndarray] = []
    ys: list[int] = []
    counts: dict[int, int] = {}
    for i in rng.permutation(len(dataset)).tolist():
        x, y = dataset[i]
        y = y.item() if isinstance(y, torch.Tensor) else y
        if not isinstance(y, int | np.integer):
            return None  # not a classification data set
        if counts.get(int(y), 0) >= per_class:
            continue
        counts[int(y)] = counts.get(int(y), 0) + 1
        xs.append(x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
        ys.append(int(y))
        if classes and len(counts) >= classes and min(counts.values()) >= per_class:
            break
    if not xs:
        return None
    return np.stack(xs).astype(np.float32), np.asarray(ys, np.int64)


def _torch_features(backbone: Any, x: np.ndarray) -> np.ndarray:
    """Flattened features of ``x`` from a PyTorch module (or a numpy function of a batch)."""
    if not hasattr(backbone, "parameters"):
        return np.concatenate(
            [flatten_features(backbone(x[s : s + BATCH])) for s in range(0, len(x), BATCH)]
        )
    import torch

    backbone.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), BATCH):
            out.append(
                flatten_features(backbone(torch.from_numpy(x[s : s + BATCH])).float().numpy())
            )
    return np.concatenate(out)


def prepare_memory(
    backbone: Any, data: Any, config: Any, feature_size: int, seed: int = 0
) -> PreparedMemory | None:
    """Choose the exemplars (herding on ``backbone`` features of training samples) and the
    held-out samples (random, from the evaluation data) of every class.

    ``backbone`` is the PyTorch backbone (or a function from a numpy batch to features);
    ``data`` has ``train``, ``eval`` (sequences of (input, class index)) and ``labels``.

    Returns None when nothing is to be shipped (``exemplars`` and ``holdout`` 0) or the data
    has no integer class targets.
    """
    if config.exemplars <= 0 and config.holdout <= 0:
        return None
    labels = list(data.labels or [])
    ex_x, ex_y = np.zeros((0,)), np.zeros(0, np.int64)
    ho_x, ho_y = np.zeros((0,)), np.zeros(0, np.int64)
    shape: tuple[int, ...] | None = None
    if config.exemplars > 0:
        pool = _class_pool(data.train, max(config.pool, config.exemplars), seed, len(labels))
        if pool is None:
            log.warning("trainable_head.memory: the training data has no class targets; no memory")
            return None
        px, py = pool
        shape = px.shape[1:]
        feats = _torch_features(backbone, px)
        pick = [
            np.flatnonzero(py == c)[herding(feats[py == c], config.exemplars)]
            for c in np.unique(py)
        ]
        sel = np.concatenate(pick)
        ex_x, ex_y = px[sel], py[sel]
    if config.holdout > 0:
        held = _class_pool(data.eval, config.holdout, seed + 1, len(labels))
        if held is None:
            log.warning(
                "trainable_head.memory: the evaluation data has no class targets; no memory"
            )
            return None
        ho_x, ho_y = held
        shape = ho_x.shape[1:]
    assert shape is not None
    n_classes = max(int(ex_y.max(initial=-1)), int(ho_y.max(initial=-1))) + 1
    names = labels if len(labels) >= n_classes else [str(i) for i in range(n_classes)]
    form = config.form
    if form == "auto":
        form = "inputs" if int(np.prod(shape)) <= feature_size else "features"
    empty = np.zeros((0, *shape), np.float32)
    return PreparedMemory(
        form,
        ex_x if len(ex_y) else empty,
        ex_y,
        ho_x if len(ho_y) else empty,
        ho_y,
        names,
        config.exemplars,
        config.holdout,
        config.budget,
    )


def _runtime_features(model: Any, x: np.ndarray) -> np.ndarray:
    if not len(x):
        return np.zeros((0, 0), np.float32)
    fixed = model.inputs[0].shape[0]
    step = fixed if isinstance(fixed, int) else 64
    return np.concatenate(
        [flatten_features(model(x[s : s + step])) for s in range(0, len(x), step)]
    )


def write_memory(pm: PreparedMemory, model: Any, head: Any, path: Path) -> dict[str, Any]:
    """Write ``memory.npz`` for one bundle; return its ``trainable_head.memory`` entry.

    ``model`` is the bundle's exported backbone loaded with the runtime, so that stored features
    and the reference accuracy are those the device will see. Samples are stored as float16, or
    as uint8 with a scale and an offset where that is exact (inputs made from 8-bit images).
    """
    if pm.form == "features":
        ex = _runtime_features(model, pm.exemplars.astype(np.float16).astype(np.float32))
        ho = _runtime_features(model, pm.holdout.astype(np.float16).astype(np.float32))
    else:
        ex, ho = pm.exemplars, pm.holdout
    if not len(ex):
        ex = np.zeros((0, *ho.shape[1:]), np.float32)
    if not len(ho):
        ho = np.zeros((0, *ex.shape[1:]), np.float32)
    data = memory_bytes(ex, pm.exemplar_labels, ho, pm.holdout_labels, pm.class_names)
    with np.load(io.BytesIO(data), allow_pickle=False) as z:  # exactly what the device reads
        stored = decode_samples(z, "holdout", np.asarray(z["holdout"])).astype(np.float32)
    ho_f = stored if pm.form == "features" else _runtime_features(model, stored)
    reference = (
        float((head(ho_f).argmax(1) == pm.holdout_labels).mean())
        if len(pm.holdout_labels)
        else None
    )
    from edgesmith.fsutil import atomic_write_bytes

    atomic_write_bytes(path, data)
    spec = MemorySpec(
        file=MEMORY_FILE,
        form=pm.form,  # type: ignore[arg-type]
        exemplars_per_class=pm.exemplars_per_class,
        holdout_per_class=pm.holdout_per_class,
        classes=len(pm.class_names),
        bytes=len(data),
        budget=pm.budget,
        reference_accuracy=reference,
    )
    return spec.model_dump(exclude_none=True)


def add_memory(
    manifest: dict[str, Any],
    files: dict[str, Path],
    pm: PreparedMemory,
    model: Any,
    head: Any,
    work: Path,
    artifact: Any = None,
) -> dict[str, Any]:
    """Add ``memory.npz`` to a bundle being written (files and ``trainable_head.memory``); record
    its size and its share of the bundle in the artifact's report entry."""
    stem = Path(str(manifest.get("model", "model"))).stem
    path = work / f"memory-{stem}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = write_memory(pm, model, head, path)
    files[MEMORY_FILE] = path
    manifest["trainable_head"] = {**manifest["trainable_head"], "memory": spec}
    total = sum(Path(f).stat().st_size for f in files.values())
    classes = max(spec["classes"], 1)
    info = {
        "form": spec["form"],
        "exemplars": len(pm.exemplar_labels),
        "holdout": len(pm.holdout_labels),
        "bytes": spec["bytes"],
        "bytes_per_class": round(spec["bytes"] / classes),
        "bundle_bytes": total,
        "share_of_bundle": round(spec["bytes"] / total, 4) if total else None,
        "reference_accuracy": spec.get("reference_accuracy"),
    }
    if artifact is not None:
        artifact.extra["memory"] = info
    return info
