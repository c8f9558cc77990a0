"""Training a numpy head: softmax cross-entropy, SGD with momentum or Adam (PyTorch's update
rules), L2 on the weights, class-balanced loss weights, distillation from a previous head, and
early stopping on a held-out split. Used by :mod:`edgesmith.runtime.finetune` (bundles) and
:mod:`edgesmith.runtime.finetune.incremental` (batches over time); numpy only.

Example:
    >>> result = train_head(head, features, labels, FinetuneConfig(epochs=20), val=(fv, yv))  # doctest: +SKIP
    >>> result.head, result.best_epoch, result.history[-1]["val_accuracy"]                    # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgesmith.errors import DataError
from edgesmith.progress import track
from edgesmith.runtime.finetune.head import Head, flatten_features
from edgesmith.validation import validate

__all__ = [
    "OPTIMIZERS",
    "SGD",
    "Adam",
    "FinetuneConfig",
    "TrainResult",
    "balanced_weights",
    "cross_entropy",
    "evaluate_head",
    "feature_stats",
    "init_like",
    "stratified_split",
    "train_head",
]


DEFAULT_DISTILL = 2.0  # picked on benchmarks/finetune_effnet.py (docs/benchmarks.md)


class FinetuneConfig(BaseModel):
    """How the head is trained (every field has a device-friendly default)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=30, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float | None = Field(default=None, gt=0)  # None: 3e-3 for Adam, 1e-2 for SGD
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)  # L2 on weights (not biases)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    balance: bool = True  # class-balanced loss weights: n / (k * n_class)
    patience: int | None = Field(default=5, ge=1)  # early stopping on held-out loss; None: off
    min_delta: float = Field(default=0.0, ge=0)
    val_fraction: float = Field(default=0.2, gt=0, lt=1)  # held out when no split is given
    # weight of distillation from the current head (LwF); None: 2.0 when old classes are to be
    # kept (the bundle's memory, a replay buffer, or new classes), else 0
    distill: float | None = Field(default=None, ge=0)
    temperature: float = Field(default=2.0, gt=0)
    memory: bool = True  # train on the bundle's exemplars of its build classes and check them
    # adding classes: freeze what the old classes' logits depend on (they stay exact); the new
    # classes get `grow` hidden units of their own in an MLP head (None: 2 per class, >= 8)
    isolate: bool = True
    grow: int | None = Field(default=None, ge=0, le=4096)
    align: bool = True  # weight aligning of new classes' output rows after training (WA)
    normalize: bool = True  # standardise features with the training data's statistics
    warm_start: bool = True  # start from the current head (False: re-initialise it)
    seed: int = 0

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-3 if self.optimizer == "adam" else 1e-2)

    def distill_weight(self, keep_old: bool) -> float:
        """The distillation weight: ``distill`` if set, else 2.0 when old classes are kept."""
        if self.distill is not None:
            return self.distill
        return DEFAULT_DISTILL if keep_old else 0.0

    @classmethod
    def build(
        cls, config: FinetuneConfig | dict[str, Any] | None, **overrides: Any
    ) -> FinetuneConfig:
        """A config from another config or a dict plus keyword overrides; errors name the key."""
        base = config.model_dump() if isinstance(config, FinetuneConfig) else dict(config or {})
        base.update({k: v for k, v in overrides.items() if v is not None})
        return validate(
            cls, base, source="fine-tune options", hint=f"options: {', '.join(cls.model_fields)}"
        )


# --------------------------------------------------------------------------- loss and optimizers


def feature_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation per feature for standardisation.

    The deviation has a floor (a tenth of the median over features): a feature that is (nearly)
    constant in the training data, such as a ReLU unit these classes never fire, would otherwise
    be divided by ~0 and blow up on samples where it does fire.
    """
    x = flatten_features(x).astype(np.float64)
    std = x.std(0)
    floor = 0.1 * float(np.median(std)) or 1e-3
    return x.mean(0), np.maximum(std, floor)


def balanced_weights(y: np.ndarray, classes: int) -> np.ndarray:
    """Per-class loss weights ``n / (k * n_c)`` over the classes present (absent classes: 0)."""
    counts = np.bincount(y, minlength=classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w.astype(np.float32)


def cross_entropy(
    logits: np.ndarray,
    y: np.ndarray,
    class_weights: np.ndarray | None = None,
    smoothing: float = 0.0,
) -> tuple[float, np.ndarray]:
    """Softmax cross-entropy and its gradient with respect to the logits.

    The loss is the weighted mean ``sum_i w[y_i] * l_i / sum_i w[y_i]`` (as PyTorch's
    ``cross_entropy(weight=...)``); ``smoothing`` mixes the one-hot target with a uniform one.
    """
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n, k = logits.shape
    target = np.full((n, k), smoothing / k)
    target[np.arange(n), y] += 1.0 - smoothing
    per_sample = -(target * logp).sum(axis=1)
    w = class_weights[y].astype(np.float64) if class_weights is not None else np.ones(n)
    total = w.sum() or 1.0
    loss = float((w * per_sample).sum() / total)
    grad = (np.exp(logp) - target) * (w / total)[:, None]
    return loss, grad.astype(np.float32)


def _distillation(
    logits: np.ndarray, teacher: np.ndarray, temperature: float
) -> tuple[float, np.ndarray]:
    """``T^2 KL(softmax(teacher/T) || softmax(logits[:, :k]/T))`` (mean over samples), and its
    gradient with respect to ``logits[:, :k]``."""

    def log_softmax(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float64) / temperature
        a = a - a.max(axis=1, keepdims=True)
        return a - np.log(np.exp(a).sum(axis=1, keepdims=True))

    k = teacher.shape[1]
    lp, lq = log_softmax(teacher), log_softmax(logits[:, :k])
    p = np.exp(lp)
    n = len(logits)
    loss = float(temperature**2 * (p * (lp - lq)).sum() / n)
    grad = temperature * (np.exp(lq) - p) / n
    return loss, grad.astype(np.float32)


def _decays(name: str) -> bool:
    return name.endswith(".weight")


class SGD:
    """SGD with momentum and L2 (PyTorch's update: ``v = m v + g``, ``p -= lr v``)."""

    def __init__(self, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self._v: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        for k, g in grads.items():
            if self.weight_decay and _decays(k):
                g = g + self.weight_decay * params[k]
            if self.momentum:
                v = self._v.get(k)
                v = g.copy() if v is None else self.momentum * v + g
                self._v[k] = v
                g = v
            params[k] -= self.lr * g


class Adam:
    """Adam with L2 added to the gradient (PyTorch's ``Adam(weight_decay=...)``)."""

    def __init__(
        self,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self._m: dict[str, np.ndarray] = {}
        self._v: dict[str, np.ndarray] = {}
        self._t = 0

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self._t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self._t, 1 - b2**self._t
        for k, g in grads.items():
            if self.weight_decay and _decays(k):
                g = g + self.weight_decay * params[k]
            m = self._m.get(k, np.zeros_like(g))
            v = self._v.get(k, np.zeros_like(g))
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * (g * g)
            self._m[k], self._v[k] = m, v
            params[k] -= (self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)).astype(np.float32)


OPTIMIZERS: dict[str, Any] = {"adam": Adam, "sgd": SGD}


def _optimizer(config: FinetuneConfig) -> Any:
    if config.optimizer == "sgd":
        return SGD(config.learning_rate, config.momentum, config.weight_decay)
    return Adam(config.learning_rate, config.weight_decay)


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """A trained head and its per-epoch history (``loss``, ``accuracy``, ``val_*``, ``seconds``)."""

    head: Head
    history: list[dict[str, float]]
    best_epoch: int
    stopped_early: bool

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.mean([h["seconds"] for h in self.history])) if self.history else 0.0


def evaluate_head(
    head: Head,
    features: np.ndarray,
    y: np.ndarray,
    class_weights: np.ndarray | None = None,
    among: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Top-1 accuracy, loss and per-class accuracy (None for absent classes) of a head.

    ``among`` restricts the prediction to those classes (e.g. the first classes of an
    incremental run: how well they are still told apart, whatever the new classes do).
    """
    if len(y) == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "per_class": [], "samples": 0}
    logits = head(features)
    k = logits.shape[1]
    y_eval = np.where(y < k, y, 0)  # labels the head cannot give (new classes) count as wrong
    loss, _ = cross_entropy(logits, y_eval, class_weights)
    if among is not None:
        mask = np.full(k, -np.inf, np.float32)
        mask[[c for c in among if c < k]] = 0
        logits = logits + mask
    pred = logits.argmax(1)
    hit = pred == y
    per_class = [
        float(hit[y == c].mean()) if (y == c).any() else None
        for c in range(max(k, int(y.max()) + 1))
    ]
    return {"accuracy": float(hit.mean()), "loss": loss, "per_class": per_class, "samples": len(y)}


def init_like(head: Head, rng: np.random.Generator) -> Head:
    """Fresh weights with PyTorch's nn.Linear initialisation: U(-1/sqrt(in), 1/sqrt(in))."""
    out = head.copy()
    for i in out.linear_indices():
        w = out.params[f"layers.{i}.weight"]
        bound = 1.0 / math.sqrt(w.shape[1])
        out.params[f"layers.{i}.weight"] = rng.uniform(-bound, bound, w.shape).astype(np.float32)
        out.params[f"layers.{i}.bias"] = rng.uniform(-bound, bound, w.shape[0]).astype(np.float32)
    return out


def train_head(
    head: Head,
    x: np.ndarray,
    y: np.ndarray,
    config: FinetuneConfig | None = None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    description: str = "fine-tune head",
    teacher: np.ndarray | None = None,
    frozen: dict[str, np.ndarray] | None = None,
) -> TrainResult:
    """Train (a copy of) ``head`` on features ``x`` and class indices ``y``.

    Args:
        head: the starting head (warm start); it is not modified.
        x: features (N, feature_size) or backbone outputs (N, ...).
        y: class indices in ``[0, head.classes)``.
        config: optimiser, epochs, L2, balancing, early stopping.
        val: held-out (features, labels) for early stopping; the weights of the epoch with the
            lowest held-out loss are kept (epoch 0: the starting head).
        teacher: logits of the previous head on ``x`` (N, old classes): the loss adds (with
            ``config.distill`` > 0, or unset) knowledge distillation (Hinton et al., 2015; as in
            LwF and iCaRL) that keeps the old classes' outputs, ``distill * T^2 * KL(p_old || p_new)``
            at temperature ``config.temperature``.

        frozen: boolean masks (``{"layers.0.weight": mask}``) of parameter entries that keep
            their starting values (the old classes' part of a head grown by
            :meth:`~edgesmith.runtime.finetune.head.Head.grow`).

    Returns:
        The trained head with its history; a progress bar shows loss and accuracy per epoch.
    """
    cfg = config or FinetuneConfig()
    rng = np.random.default_rng(cfg.seed)
    x = flatten_features(x)
    y = np.asarray(y, np.int64)
    if len(x) != len(y) or len(x) == 0:
        raise DataError(
            f"{len(x)} feature rows but {len(y)} labels", hint="give one label per sample"
        )
    if y.min() < 0 or y.max() >= head.classes:
        raise DataError(
            f"labels must lie in [0, {head.classes}), got {int(y.min())}..{int(y.max())}",
            hint="add the new classes to the head first (add_classes=True)",
        )
    trained = head.copy()
    # the standardisation is fixed during training: run the layers on pre-standardised features
    core = Head(trained.layers, trained.params, False, trained.feature_size)
    z = trained.standardise(x)
    zv = trained.standardise(flatten_features(val[0])) if val is not None and len(val[1]) else None
    yv = np.asarray(val[1], np.int64) if zv is not None and val is not None else None
    weights = balanced_weights(y, head.classes) if cfg.balance else None
    kd_weight = cfg.distill_weight(keep_old=teacher is not None)
    opt = _optimizer(cfg)
    keep = {k: (m, core.params[k][m].copy()) for k, m in (frozen or {}).items() if m.any()}
    history: list[dict[str, float]] = []
    best_loss, best_epoch, best_params, bad = math.inf, 0, None, 0
    if zv is not None and yv is not None and cfg.patience is not None:
        # the starting head is epoch 0: training that only hurts gives it back unchanged
        start_logits, _ = core.forward(zv)
        best_loss, _ = cross_entropy(start_logits, np.where(yv < core.classes, yv, 0))
        best_params = {k: v.copy() for k, v in core.params.items()}
    status: dict[str, object] = {}
    stopped = False
    for epoch in track(range(cfg.epochs), description, status=status):
        t0 = time.perf_counter()
        perm = rng.permutation(len(z))
        loss_sum, correct = 0.0, 0
        for s in range(0, len(z), cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            logits, cache = core.forward(z[idx], train=True, rng=rng)
            loss, grad = cross_entropy(logits, y[idx], weights, cfg.label_smoothing)
            if teacher is not None and kd_weight > 0:
                kd, kd_grad = _distillation(logits, teacher[idx], cfg.temperature)
                loss += kd_weight * kd
                grad[:, : kd_grad.shape[1]] += kd_weight * kd_grad
            opt.step(core.params, core.backward(cache, grad))
            for k, (mask, values) in keep.items():
                core.params[k][mask] = values
            loss_sum += loss * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        row: dict[str, float] = {
            "epoch": epoch + 1,
            "loss": loss_sum / len(z),
            "accuracy": correct / len(z),
        }
        if zv is not None and yv is not None:
            vl, _ = core.forward(zv)
            row["val_loss"], _ = cross_entropy(vl, np.where(yv < core.classes, yv, 0))
            row["val_accuracy"] = float((vl.argmax(1) == yv).mean())
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        status.update(
            {k: round(v, 4) for k, v in row.items() if k in ("loss", "accuracy", "val_accuracy")}
        )
        if zv is None or cfg.patience is None:
            best_epoch = epoch + 1
            continue
        if row["val_loss"] < best_loss - cfg.min_delta:
            best_loss, best_epoch, bad = row["val_loss"], epoch + 1, 0
            best_params = {k: v.copy() for k, v in core.params.items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                stopped = True
                break
    if best_params is not None:
        trained.params.update(best_params)
    return TrainResult(trained, history, best_epoch, stopped)


def stratified_split(
    y: np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held-out): ``fraction`` of every class with 2+ samples is held out."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = round(fraction * len(idx)) if len(idx) >= 2 else 0
        n = min(max(n, 1 if len(idx) >= 2 else 0), len(idx) - 1)
        held.append(idx[:n])
        train.append(idx[n:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))
