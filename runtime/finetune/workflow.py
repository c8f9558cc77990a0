"""On-device fine-tuning of a bundle's trainable head, in numpy only.

onnxruntime-training cannot be installed next to onnxruntime (DESIGN.md section 7), and a device
has no torch: the backbone runs on the inference backend once per sample (:class:`FeatureCache`),
and the head (runtime/head.py) is trained in numpy (runtime/training.py: softmax cross-entropy,
SGD with momentum or Adam, L2 on the weights, class-balanced loss weights, early stopping on a
held-out split). The result is a new bundle version (:func:`write_finetuned`): same backbone file,
new ``head.npz``, regenerated golden outputs, updated metrics and provenance, signed with the
device key if given.

Example:
    >>> model = load("bundles/fmnist-cnn-head")                       # doctest: +SKIP
    >>> result = model.finetune(images, labels, epochs=20, out="fmnist-cnn-head-v2")  # doctest: +SKIP
    >>> result.metrics["holdout_accuracy"], result.metrics["previous_holdout_accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import BundleError, DataError
from edgesmith.runtime.finetune.derive import derive_bundle
from edgesmith.runtime.finetune.features import FeatureCache, encode_labels, label_key, require_head
from edgesmith.runtime.finetune.head import Head, backbone_fingerprint
from edgesmith.runtime.finetune.memory import (
    Memory,
    align_weights,
    check_old_classes,
    label_accuracy,
    load_memory,
)
from edgesmith.runtime.finetune.training import (
    FinetuneConfig,
    TrainResult,
    evaluate_head,
    feature_stats,
    init_like,
    stratified_split,
    train_head,
)

__all__ = [
    "FeatureCache",
    "FinetuneConfig",
    "FinetuneResult",
    "Fit",
    "encode_labels",
    "finetune_model",
    "fit_head",
    "label_key",
    "require_head",
    "write_finetuned",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the bundle workflow


@dataclass
class FinetuneResult:
    """What :func:`finetune_model` produced."""

    head: Head
    labels: list[str]
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    trained: dict[str, Any]
    bundle: Path | None = None
    holdout: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def improved(self) -> bool:
        """Whether the new head is at least as accurate on the held-out split as the old one."""
        return bool(self.metrics["holdout_accuracy"] >= self.metrics["previous_holdout_accuracy"])


def _class_groups(per_class: list[Any], new: set[int]) -> dict[str, float | None]:
    def mean(ix: list[int]) -> float | None:
        vals = [per_class[i] for i in ix if i < len(per_class) and per_class[i] is not None]
        return float(np.mean(vals)) if vals else None

    all_ix = list(range(len(per_class)))
    return {
        "old_classes": mean([i for i in all_ix if i not in new]),
        "new_classes": mean(sorted(new)),
        "all_classes": mean(all_ix),
    }


def _bundle_memory(model: Any) -> Memory | None:
    """The memory the model's bundle ships (None: none, or a bare model file)."""
    m = model.manifest
    src = Path(model.info.get("path") or "")
    if m is None or not src.is_dir():
        return None
    return load_memory(src, m.trainable_head, m)


def _memory_labels(names: np.ndarray, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``labels`` of memory class names, and which names were found."""
    lookup = {label_key(lab): i for i, lab in reversed(list(enumerate(labels)))}
    idx = np.asarray([lookup.get(label_key(str(n)), -1) for n in names.tolist()], np.int64)
    return idx, idx >= 0


def _summary_groups(
    head0: Head,
    head: Head,
    known: list[str],
    labels: list[str],
    new: set[int],
    fv: np.ndarray,
    yv: np.ndarray,
    memory: tuple[np.ndarray, np.ndarray] | None,
) -> dict[str, dict[str, Any]]:
    """Accuracy on the old, new and all classes, before and after, and on which samples.

    Old classes are measured on the bundle's held-out memory samples when it has them (the
    device's held-out split rarely holds old classes when classes are added), plus any held-out
    samples of old classes; new classes on the held-out split; all classes on both together.
    """
    names_v = np.asarray([labels[i] for i in yv.tolist()], dtype=str)
    is_new = np.isin(yv, sorted(new))
    sets: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"old_classes": [], "new_classes": []}
    if (~is_new).any():
        sets["old_classes"].append((fv[~is_new], names_v[~is_new]))
    if is_new.any():
        sets["new_classes"].append((fv[is_new], names_v[is_new]))
    if memory is not None and len(memory[1]):
        sets["old_classes"].append(memory)
    sets["all_classes"] = sets["old_classes"] + sets["new_classes"]
    out: dict[str, dict[str, Any]] = {}
    for group, parts in sets.items():
        if not parts:
            out[group] = {"before": None, "after": None, "samples": 0}
            continue
        f = np.concatenate([p[0] for p in parts])
        n = np.concatenate([p[1] for p in parts])
        out[group] = {
            "before": label_accuracy(head0, known, f, n),
            "after": label_accuracy(head, labels, f, n),
            "samples": len(n),
        }
    on_old = "the bundle's held-out memory samples" if memory is not None else "the held-out split"
    out["old_classes"]["on"] = on_old + (
        " and the held-out split" if memory is not None and (~is_new).any() else ""
    )
    out["new_classes"]["on"] = "the held-out split"
    out["all_classes"]["on"] = "both"
    return out


@dataclass
class Fit:
    """What :func:`fit_head` did: the head, the training run, and how the old classes were kept."""

    head: Head
    result: TrainResult
    distill: float
    isolated: bool
    grown: int
    aligned: float
    old_samples: int


def grow_units(head: Head, new_classes: int, config: FinetuneConfig) -> int:
    """Hidden units added for new classes (``config.grow``; None: 2 per new class, at least 8;
    0 for a linear head, which has no hidden layer)."""
    if new_classes <= 0 or len(head.linear_indices()) < 2:
        return 0
    return config.grow if config.grow is not None else max(8, 2 * new_classes)


def fit_head(
    head0: Head,
    classes: int,
    x: np.ndarray,
    y: np.ndarray,
    val: tuple[np.ndarray, np.ndarray],
    config: FinetuneConfig,
    old: tuple[np.ndarray, np.ndarray] | None = None,
) -> Fit:
    """Train ``head0`` (extended to ``classes`` outputs) on features ``x``/``y``, keeping what it
    knew: the training step of :func:`finetune_model`, on features (benchmarks call it too).

    ``old`` are features and labels of earlier classes to replay (the bundle's exemplars, a
    replay buffer). When classes are added and ``config.isolate`` is on, the old classes'
    parameters are frozen (:meth:`Head.grow`: their logits stay exactly as they were; the new
    classes get ``grow`` hidden units of their own in an MLP head) and the replayed samples teach
    the new classes what they are not; otherwise the head is trained as a whole with distillation
    from ``head0`` (learning without forgetting). Then the new output rows are aligned to the old
    ones (``config.align``, weight aligning). Early stopping watches ``val`` plus the replayed
    samples.
    """
    ox, oy = (
        old if old is not None else (np.zeros((0, x.shape[1]), np.float32), np.zeros(0, np.int64))
    )
    ox = ox if len(oy) else np.zeros((0, x.shape[1]), np.float32)
    rng = np.random.default_rng(config.seed)
    n_new = classes - head0.classes
    new = list(range(head0.classes, classes))
    examples = [x[y == c] for c in new]
    train_x, train_y = np.concatenate([x, ox]), np.concatenate([y, oy])
    isolate = n_new > 0 and config.isolate and config.warm_start
    grown, masks = 0, None
    if isolate:
        base = head0.renormalize(*feature_stats(train_x)) if config.normalize else head0
        grown = grow_units(head0, n_new, config)
        start, masks = base.grow(n_new, grown, rng, examples)
        kd = 0.0  # the old logits cannot change: nothing to distil
    else:
        start = head0.add_classes(n_new, rng, examples)
        if not config.warm_start:
            start = init_like(start, rng)
        if config.normalize:
            start = start.renormalize(*feature_stats(train_x))
        kd = config.distill_weight(keep_old=n_new > 0 or len(oy) > 0)
    teacher = head0(train_x) if kd > 0 else None
    fv, yv = val
    run_val = (np.concatenate([fv, ox]), np.concatenate([yv, oy]))
    result = train_head(
        start,
        train_x,
        train_y,
        config.model_copy(update={"distill": kd}),
        val=run_val,
        teacher=teacher,
        frozen=masks,
    )
    head, gamma = result.head, 1.0
    if config.align and n_new > 0 and head0.classes:
        head, gamma = align_weights(head, head0.classes)
    return Fit(head, result, kd, isolate, grown, gamma, len(oy))


def finetune_model(
    model: Any,
    x: np.ndarray,
    y: Sequence[Any] | np.ndarray,
    *,
    config: FinetuneConfig | dict[str, Any] | None = None,
    add_classes: bool = False,
    holdout: tuple[np.ndarray, Sequence[Any] | np.ndarray] | None = None,
    out: str | Path | None = None,
    sign_key: Any = None,
    cache: FeatureCache | None = None,
    replay: Any = None,
    **options: Any,
) -> FinetuneResult:
    """Fine-tune the trainable head of a loaded bundle on this device.

    The old classes are kept by default: when the bundle ships a memory of its build classes
    (runtime/memory.py), their exemplars are trained on together with the new data. When
    classes are added (``config.isolate``, the default) the old classes' path is frozen and
    grown hidden units learn the new ones, so there is nothing to distil; otherwise the current
    head is distilled on all of it (learning without forgetting). After new classes were added
    their output rows are aligned to the old ones (weight aligning). The result
    states the accuracy on the old classes (the memory's held-out samples), the new classes
    and all classes, before and after, and whether the old classes stayed within the bundle's
    budget (``metrics["old_class_check"]``).

    Args:
        model: a :class:`~edgesmith.runtime.Model` of a bundle with ``trainable_head``.
        x: samples: uint8 images (preprocessed as the manifest says) or model inputs.
        y: class indices, or label names (names outside the model's labels need ``add_classes``).
        config: a :class:`FinetuneConfig` or dict; ``options`` override single fields
            (``epochs=20, optimizer="sgd", memory=False``...).
        add_classes: learn labels the model does not know (new output rows).
        holdout: (x, y) held out for early stopping and the before/after comparison; None holds
            out ``config.val_fraction`` of every class.
        out: write the new bundle version here (see :func:`write_finetuned`).
        sign_key: the device's Ed25519 private key (file or key object) that signs the new bundle.
        cache: a :class:`FeatureCache` (persist features across runs); None: this run only.
        replay: an :class:`~edgesmith.runtime.finetune.incremental.ReplayBuffer` of earlier samples'
            features, trained on together with the new data and then updated with it.

    Returns:
        A :class:`FinetuneResult`; ``metrics`` has the held-out accuracy before and after, per
        old, new and all classes.

    Raises:
        BundleError: the model has no trainable head, or a malformed memory file.
        DataError: bad labels or data.
    """
    head0 = require_head(model)
    cfg = FinetuneConfig.build(config, **options)
    x = np.asarray(x)
    if len(x) == 0:
        raise DataError("no training samples", hint="give at least one sample per class")
    if len(x) != len(y):
        raise DataError(f"{len(x)} samples but {len(y)} labels", hint="one label per sample")
    known = list(model.labels or [str(i) for i in range(head0.classes)])
    yi, labels = encode_labels(y, known, add_classes)
    if holdout is not None:
        xv = np.asarray(holdout[0])
        yv, labels = encode_labels(holdout[1], labels, add_classes)
        xt, yt = x, yi
    else:
        tr, va = stratified_split(yi, cfg.val_fraction, cfg.seed)
        xt, yt, xv, yv = x[tr], yi[tr], x[va], yi[va]
    if len(yv) == 0:
        raise DataError(
            "the held-out split is empty",
            hint="give at least two samples of a class, or a val/ folder",
        )
    cache = cache or FeatureCache()
    ft = cache.features(model, xt, description="backbone features (train)")
    fv = cache.features(model, xv, description="backbone features (held-out)")
    new = set(range(len(known), len(labels)))
    mem = _bundle_memory(model)  # measured in any case; trained on unless memory=False
    ex_f, ex_y = np.zeros((0, ft.shape[1]), np.float32), np.zeros(0, np.int64)
    ho: tuple[np.ndarray, np.ndarray] | None = None
    if mem is not None:
        ho = (mem.features(model, "holdout", cache), mem.names("holdout"))
    if mem is not None and cfg.memory:
        ex_y, found = _memory_labels(mem.names("exemplars"), known)
        ex_f = mem.features(model, "exemplars", cache)[found]
        ex_y = ex_y[found]
    parts_x, parts_y = [ex_f], [ex_y]
    if replay is not None and len(replay):
        rx, ry = replay.arrays(FeatureCache.backbone_id(model), labels)
        parts_x.append(rx)
        parts_y.append(ry)
    fit = fit_head(
        head0,
        len(labels),
        ft,
        yt,
        (fv, yv),
        cfg,
        old=(np.concatenate(parts_x), np.concatenate(parts_y)),
    )
    head, result = fit.head, fit.result
    before = evaluate_head(head0, fv, yv)
    after = evaluate_head(head, fv, yv)
    if replay is not None:
        replay.add(ft, yt, FeatureCache.backbone_id(model), labels)
    cache.save()
    m = model.manifest
    base_version = (
        (m.trainable_head or {}).get("trained", {}).get("base_version", m.version) if m else None
    )
    trained = {
        "by": "device",
        "at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "parent_version": model.version,
        "base_version": base_version,
        "backbone": backbone_fingerprint(m) if m else None,
        "samples": len(yt),
        "holdout_samples": len(yv),
        "memory_samples": len(ex_y),
        "replay_samples": fit.old_samples - len(ex_y),
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "optimizer": cfg.optimizer,
        "lr": cfg.learning_rate,
        "weight_decay": cfg.weight_decay,
        "balance": cfg.balance,
        "distill": fit.distill,
        "isolated": fit.isolated,
        "grown_units": fit.grown,
        "aligned": round(fit.aligned, 6) if fit.aligned != 1.0 else None,
        "added_classes": [labels[i] for i in sorted(new)],
    }
    metrics: dict[str, Any] = {
        "holdout_accuracy": after["accuracy"],
        "previous_holdout_accuracy": before["accuracy"],
        "holdout_loss": after["loss"],
        "previous_holdout_loss": before["loss"],
        "per_class": after["per_class"],
        "previous_per_class": before["per_class"],
        "before": _class_groups(before["per_class"], new),
        "after": _class_groups(after["per_class"], new),
        "classes": _summary_groups(head0, head, known, labels, new, fv, yv, ho),
        "seconds_per_epoch": result.seconds_per_epoch,
        "stopped_early": result.stopped_early,
        "feature_cache": {"hits": cache.hits, "misses": cache.misses},
    }
    if mem is not None and ho is not None and len(ho[1]):
        check = check_old_classes(
            mem, ho[0], head, labels, label_accuracy(head0, known, *ho), "before fine-tuning"
        )
        metrics["old_class_check"] = check.to_json()
    res = FinetuneResult(head, labels, metrics, result.history, trained, holdout=(xv, yv))
    if out is not None:
        res.bundle = write_finetuned(model, res, out, sign_key=sign_key)
    return res


def write_finetuned(
    model: Any, result: FinetuneResult, out: str | Path, sign_key: Any = None
) -> Path:
    """Write ``result`` as the next version of ``model``'s bundle (atomically).

    The backbone and every other file are copied unchanged; ``head.npz`` is the new head; the
    golden outputs are recomputed (same inputs, backbone here plus the new head) with the old
    tolerances scaled to the new logits; ``version`` grows by one; ``labels`` and
    ``trainable_head`` (with ``trained`` provenance) and ``metrics`` are updated.

    Raises:
        BundleError: the model was not loaded from a bundle folder, or ``out`` exists.
    """
    m = model.manifest
    src = Path(model.info.get("path") or "")
    if m is None or not src.is_dir():
        raise BundleError(
            "only a model loaded from a bundle folder can be written as a new version",
            hint="load the bundle folder, not the model file",
        )
    metrics = {
        "metric": "top1",
        "accuracy": result.metrics["holdout_accuracy"],
        "evaluated_on": "device holdout",
        **{
            k: v
            for k, v in result.metrics.items()
            if k not in ("per_class", "previous_per_class", "history")
        },
        "build": m.metrics.get("build", m.metrics),
    }
    derive_bundle(
        src,
        m,
        out,
        head=result.head,
        features=model.features,
        labels=result.labels,
        trained=result.trained,
        metrics=metrics,
        version=m.version + 1,
        sign_key=sign_key,
    )
    return Path(out)
