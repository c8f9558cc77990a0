"""Incremental learning: data arrives in batches over time; a bounded replay buffer of earlier
samples' *features* is trained on together with each new batch, so old classes are not forgotten.

The buffer keeps at most ``capacity`` samples, split evenly over the classes seen so far; within
a class it is a reservoir sample (every sample seen has the same chance to be kept). It stores
backbone features (not images: smaller, and no raw data is kept), tied to the backbone's file
hash: after an OTA update of the backbone the old features are dropped.

Example:
    >>> learner = IncrementalLearner(model.head, model.labels, capacity=1000)   # doctest: +SKIP
    >>> for feats, names in batches:                                            # doctest: +SKIP
    ...     report = learner.learn(feats, names, eval_features, eval_names)
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import DataError
from edgesmith.runtime.finetune.features import encode_labels
from edgesmith.runtime.finetune.head import Head, flatten_features
from edgesmith.runtime.finetune.training import (
    FinetuneConfig,
    evaluate_head,
    feature_stats,
    stratified_split,
    train_head,
)

__all__ = ["IncrementalLearner", "ReplayBuffer", "StepReport"]

log = logging.getLogger(__name__)


class ReplayBuffer:
    """A class-balanced reservoir of (feature, label) pairs, at most ``capacity`` in all."""

    def __init__(self, capacity: int = 2000, seed: int = 0) -> None:
        if capacity < 1:
            raise DataError(f"replay capacity must be positive, got {capacity}", hint="e.g. 2000")
        self.capacity = capacity
        self.backbone: str | None = None
        self.labels: list[str] = []
        self._x: dict[int, list[np.ndarray]] = {}
        self._seen: dict[int, int] = {}
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return sum(len(v) for v in self._x.values())

    def counts(self) -> dict[str, int]:
        return {self.labels[c]: len(v) for c, v in sorted(self._x.items())}

    def _check(self, backbone: str, labels: list[str]) -> None:
        if self.backbone is not None and backbone != self.backbone:
            log.warning(
                "the backbone changed: dropping %d replay samples of the old one", len(self)
            )
            self._x.clear()
            self._seen.clear()
        self.backbone = backbone
        if labels[: len(self.labels)] != self.labels:
            raise DataError(
                "the replay buffer's classes do not match the model's",
                hint="start a new replay file for this model",
            )
        self.labels = list(labels)

    def add(self, x: np.ndarray, y: np.ndarray, backbone: str, labels: list[str]) -> None:
        """Offer samples (features, class indices into ``labels``) to the buffer."""
        self._check(backbone, labels)
        x = flatten_features(x)
        for row, c in zip(x, np.asarray(y, np.int64).tolist(), strict=True):
            slot = self._x.setdefault(c, [])
            self._seen[c] = self._seen.get(c, 0) + 1
            per_class = max(self.capacity // max(len(self._x), 1), 1)
            if len(slot) < per_class:
                slot.append(row.astype(np.float16))
            else:
                j = int(self._rng.integers(self._seen[c]))
                if j < len(slot):
                    slot[j] = row.astype(np.float16)
        self._shrink()

    def _shrink(self) -> None:
        per_class = max(self.capacity // max(len(self._x), 1), 1)
        for c, rows in self._x.items():
            if len(rows) > per_class:
                keep = self._rng.choice(len(rows), per_class, replace=False)
                self._x[c] = [rows[i] for i in sorted(keep)]

    def arrays(self, backbone: str, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All kept samples as (features float32, class indices)."""
        self._check(backbone, labels)
        if not len(self):
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
        xs = [np.stack(v) for _, v in sorted(self._x.items()) if v]
        ys = [np.full(len(v), c, np.int64) for c, v in sorted(self._x.items()) if v]
        return np.concatenate(xs).astype(np.float32), np.concatenate(ys)

    # ------------------------------------------------------------------ file

    def save(self, path: str | Path) -> Path:
        """Write the buffer as a plain ``.npz`` (mode 0600: it describes local data)."""
        from edgesmith.fsutil import atomic_write_bytes

        x, y = (
            self.arrays(self.backbone or "", self.labels)
            if self.backbone
            else (
                np.zeros((0, 0), np.float32),
                np.zeros(0, np.int64),
            )
        )
        buf = io.BytesIO()
        np.savez(
            buf,
            features=x.astype(np.float16),
            labels=y,
            seen=np.array([self._seen.get(c, 0) for c in range(len(self.labels))], np.int64),
            class_names=np.array(self.labels, dtype=str),
            backbone=np.array(self.backbone or "", dtype=str),
            capacity=np.array(self.capacity, np.int64),
        )
        p = Path(path)
        atomic_write_bytes(p, buf.getvalue(), mode=0o600)
        return p

    @classmethod
    def load(cls, path: str | Path, capacity: int | None = None, seed: int = 0) -> ReplayBuffer:
        """Read a buffer written by :meth:`save`; a missing file gives an empty buffer."""
        p = Path(path)
        if not p.is_file():
            return cls(capacity or 2000, seed)
        try:
            with np.load(p, allow_pickle=False) as z:
                x, y, seen = z["features"], z["labels"], z["seen"]
                names = [str(s) for s in z["class_names"].tolist()]
                backbone, cap = str(z["backbone"]), int(z["capacity"])
        except (ValueError, OSError, KeyError) as exc:
            raise DataError(
                f"cannot read replay buffer {p}: {exc}", hint="delete it to start a new one"
            ) from None
        buf = cls(capacity or cap, seed)
        buf.labels, buf.backbone = names, backbone or None
        for row, c in zip(x, y.tolist(), strict=True):
            buf._x.setdefault(int(c), []).append(row)
        buf._seen = {c: int(n) for c, n in enumerate(seen.tolist()) if n}
        buf._shrink()
        return buf


@dataclass
class StepReport:
    """Accuracy before and after one arriving batch, on the old and the new classes."""

    step: int
    new_classes: list[str]
    samples: int
    replayed: int
    before: dict[str, float | None]
    after: dict[str, float | None]
    per_class: list[float | None] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "new_classes": self.new_classes,
            "samples": self.samples,
            "replayed": self.replayed,
            "before": self.before,
            "after": self.after,
            "per_class": self.per_class,
            "seconds": round(self.seconds, 3),
        }


def _group_accuracy(per_class: list[Any], ix: Sequence[int]) -> float | None:
    vals = [per_class[i] for i in ix if i < len(per_class) and per_class[i] is not None]
    return float(np.mean(vals)) if vals else None


class IncrementalLearner:
    """Learns a head from batches of (features, labels) that arrive over time, with replay.

    Args:
        head: the starting head (e.g. ``model.head``).
        labels: its class names; new names in a batch add classes.
        config: training settings for every step (warm start from the previous step's head);
            the default adds distillation from the previous head (``distill=2.0``).
        capacity: replay buffer size (samples); 0 disables replay (plain fine-tuning, forgets).
        backbone: the backbone id the features come from (``FeatureCache.backbone_id(model)``).
    """

    def __init__(
        self,
        head: Head,
        labels: list[str],
        config: FinetuneConfig | None = None,
        capacity: int = 2000,
        backbone: str = "features",
        seed: int = 0,
    ) -> None:
        self.head = head
        self.labels = list(labels)
        self.config = config or FinetuneConfig(distill=2.0)
        self.buffer = ReplayBuffer(capacity, seed) if capacity else None
        self.backbone = backbone
        self.first_classes: list[int] = list(range(len(labels)))
        self.steps: list[StepReport] = []
        self._rng = np.random.default_rng(seed)

    def evaluate(
        self, x: np.ndarray, y: Sequence[Any] | np.ndarray, among: Sequence[int] | None = None
    ) -> dict[str, Any]:
        """Accuracy of the current head overall and per class on labelled features (``among``:
        predictions restricted to those classes, see :func:`evaluate_head`). Samples of classes
        not learnt yet are left out."""
        yi, _ = encode_labels(y, self.labels, add_classes=True)
        known = yi < len(self.labels)
        return evaluate_head(self.head, flatten_features(x)[known], yi[known], among=among)

    def learn(
        self,
        x: np.ndarray,
        y: Sequence[Any] | np.ndarray,
        eval_x: np.ndarray | None = None,
        eval_y: Sequence[Any] | np.ndarray | None = None,
    ) -> StepReport:
        """Train on one arriving batch plus the replay buffer; report accuracy before and after.

        ``eval_x``/``eval_y`` (features and labels, possibly of classes not seen yet) measure the
        old classes (known before this batch) and the new ones, before and after the step.
        """
        import time

        t0 = time.perf_counter()
        old = list(range(len(self.labels)))
        yi, labels = encode_labels(y, self.labels, add_classes=True)
        new = list(range(len(self.labels), len(labels)))
        before: dict[str, float | None] = {"old_classes": None, "new_classes": None}
        ev = None
        if eval_x is not None and eval_y is not None:
            ev_y, _ = encode_labels(eval_y, labels, add_classes=True)
            known = ev_y < len(labels)
            ev = (flatten_features(eval_x)[known], ev_y[known])
            pc = evaluate_head(self.head, *ev)["per_class"]
            before = {
                "old_classes": _group_accuracy(pc, old),
                "new_classes": _group_accuracy(pc, new),
            }
        x = flatten_features(x)
        head = self.head.add_classes(
            len(labels) - self.head.classes, self._rng, [x[yi == c] for c in new]
        )
        tx, ty = x, yi
        if self.buffer is not None and len(self.buffer):
            rx, ry = self.buffer.arrays(self.backbone, labels)
            tx, ty = np.concatenate([x, rx]), np.concatenate([yi, ry])
        if self.config.normalize:
            head = head.renormalize(*feature_stats(tx))
        tr, va = stratified_split(ty, self.config.val_fraction, self.config.seed + len(self.steps))
        teacher = self.head(tx[tr]) if self.config.distill_weight(True) > 0 and self.steps else None
        result = train_head(
            head,
            tx[tr],
            ty[tr],
            self.config,
            val=(tx[va], ty[va]) if len(va) else None,
            description=f"incremental step {len(self.steps) + 1}",
            teacher=teacher,
        )
        self.head, self.labels = result.head, labels
        if self.buffer is not None:
            self.buffer.add(x, yi, self.backbone, labels)
        after: dict[str, float | None] = {"old_classes": None, "new_classes": None}
        per_class: list[float | None] = []
        if ev is not None:
            per_class = evaluate_head(self.head, *ev)["per_class"]
            after = {
                "old_classes": _group_accuracy(per_class, old),
                "new_classes": _group_accuracy(per_class, new),
            }
        report = StepReport(
            len(self.steps) + 1,
            [labels[i] for i in new],
            len(yi),
            len(ty) - len(yi),
            before,
            after,
            per_class,
            time.perf_counter() - t0,
        )
        self.steps.append(report)
        return report
