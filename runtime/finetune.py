"""On-device fine-tuning of a bundle's trainable head, in numpy only.

onnxruntime-training cannot be installed next to onnxruntime (DESIGN.md section 7), and a device
has no torch: the backbone runs on the inference backend once per sample (:class:`FeatureCache`),
and the head (runtime/head.py) is trained here with softmax cross-entropy, SGD with momentum or
Adam, L2 on the weights, class-balanced loss weights, and early stopping on a held-out split.
The result is a new bundle version (:func:`write_finetuned`): same backbone file, new ``head.npz``,
regenerated golden outputs, updated metrics and provenance, signed with the device key if given.

Example:
    >>> model = load("bundles/fmnist-cnn-head")                       # doctest: +SKIP
    >>> result = model.finetune(images, labels, epochs=20, out="fmnist-cnn-head-v2")  # doctest: +SKIP
    >>> result.metrics["holdout_accuracy"], result.metrics["previous_holdout_accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgesmith.errors import BundleError, DataError, EdgesmithError
from edgesmith.progress import track
from edgesmith.runtime.head import HEAD_FILE, Head, backbone_fingerprint, flatten_features

__all__ = [
    "OPTIMIZERS",
    "SGD",
    "Adam",
    "FeatureCache",
    "FinetuneConfig",
    "FinetuneResult",
    "TrainResult",
    "balanced_weights",
    "cross_entropy",
    "encode_labels",
    "evaluate_head",
    "feature_stats",
    "finetune_model",
    "label_key",
    "require_head",
    "stratified_split",
    "train_head",
    "write_finetuned",
]

log = logging.getLogger(__name__)


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
    distill: float = Field(
        default=0.0, ge=0
    )  # incremental: weight of distillation from the old head
    temperature: float = Field(default=2.0, gt=0)
    normalize: bool = True  # standardise features with the training data's statistics
    warm_start: bool = True  # start from the current head (False: re-initialise it)
    seed: int = 0

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-3 if self.optimizer == "adam" else 1e-2)

    @classmethod
    def build(
        cls, config: FinetuneConfig | dict[str, Any] | None, **overrides: Any
    ) -> FinetuneConfig:
        """A config from another config or a dict plus keyword overrides; errors name the key."""
        base = config.model_dump() if isinstance(config, FinetuneConfig) else dict(config or {})
        base.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(base)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise EdgesmithError(
                f"fine-tune option '{loc}': {err['msg']}",
                hint=f"options: {', '.join(cls.model_fields)}",
            ) from None


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


def _init_like(head: Head, rng: np.random.Generator) -> Head:
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
) -> TrainResult:
    """Train (a copy of) ``head`` on features ``x`` and class indices ``y``.

    Args:
        head: the starting head (warm start); it is not modified.
        x: features (N, feature_size) or backbone outputs (N, ...).
        y: class indices in ``[0, head.classes)``.
        config: optimiser, epochs, L2, balancing, early stopping.
        val: held-out (features, labels) for early stopping; the weights of the epoch with the
            lowest held-out loss are kept (epoch 0: the starting head).
        teacher: logits of the previous head on ``x`` (N, old classes): with
            ``config.distill > 0`` the loss adds knowledge distillation (Hinton et al., 2015; as in
            LwF and iCaRL) that keeps the old classes' outputs, ``distill * T^2 * KL(p_old || p_new)``
            at temperature ``config.temperature``.

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
    opt = _optimizer(cfg)
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
            if teacher is not None and cfg.distill > 0:
                kd, kd_grad = _distillation(logits, teacher[idx], cfg.temperature)
                loss += cfg.distill * kd
                grad[:, : kd_grad.shape[1]] += cfg.distill * kd_grad
            opt.step(core.params, core.backward(cache, grad))
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


# --------------------------------------------------------------------------- features


class FeatureCache:
    """Backbone outputs keyed by (backbone file hash, sample bytes): the backbone runs once per sample.

    Within a run every epoch reuses the features; with ``path`` (a folder) they persist across
    runs, one ``features-<backbone>.npz`` per backbone (plain arrays, read without pickle), so
    data that arrives again, or the held-out split of an earlier run, costs nothing.
    """

    def __init__(self, path: str | Path | None = None, max_items: int = 200_000) -> None:
        self.path = Path(path) if path else None
        self.max_items = max_items
        self._rows: dict[str, dict[bytes, np.ndarray]] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def backbone_id(model: Any) -> str:
        if model.manifest is not None:
            return backbone_fingerprint(model.manifest)[:32]
        return hashlib.sha256(str(model.info.get("file")).encode()).hexdigest()[:32]

    @staticmethod
    def key(sample: np.ndarray) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{sample.dtype.str}{sample.shape}".encode())
        h.update(np.ascontiguousarray(sample).tobytes())
        return h.digest()

    def _table(self, bid: str) -> dict[bytes, np.ndarray]:
        if bid not in self._rows:
            self._rows[bid] = {}
            f = self.path / f"features-{bid}.npz" if self.path else None
            if f is not None and f.is_file():
                try:
                    with np.load(f, allow_pickle=False) as z:
                        keys, feats = z["keys"], z["features"]
                    self._rows[bid] = {bytes(k): row for k, row in zip(keys, feats, strict=True)}
                except (ValueError, OSError, KeyError) as exc:
                    log.warning("ignoring unreadable feature cache %s: %s", f, exc)
        return self._rows[bid]

    def features(
        self, model: Any, x: np.ndarray, batch: int = 16, description: str = "features"
    ) -> np.ndarray:
        """Flattened backbone features of samples ``x`` (uint8 images or model inputs)."""
        x = np.asarray(x)
        bid = self.backbone_id(model)
        table = self._table(bid)
        keys = [self.key(s) for s in x]
        todo = sorted({i for i, k in enumerate(keys) if k not in table}, key=int)
        # one representative per distinct sample
        seen: dict[bytes, int] = {}
        todo = [i for i in todo if seen.setdefault(keys[i], i) == i]
        self.misses += len(todo)
        self.hits += len(x) - len(todo)
        fixed = model.inputs[0].shape[0]
        step = fixed if isinstance(fixed, int) else batch
        for s in track(range(0, len(todo), step), description):
            idx = todo[s : s + step]
            out = flatten_features(model.features(x[idx]))
            for i, row in zip(idx, out, strict=True):
                table[keys[i]] = row
        if len(table) > self.max_items:  # oldest first (dicts keep insertion order)
            for k in list(table)[: len(table) - self.max_items]:
                del table[k]
        if not len(x):
            return np.zeros((0, 0), np.float32)
        return np.stack([table[k] for k in keys])

    def save(self) -> None:
        """Write the cache folder (atomically per backbone)."""
        if self.path is None:
            return
        import io

        from edgesmith.fsutil import atomic_write_bytes

        for bid, table in self._rows.items():
            if not table:
                continue
            buf = io.BytesIO()
            np.savez(
                buf,
                keys=np.array(list(table), dtype="S16"),
                features=np.stack(list(table.values())).astype(np.float32),
            )
            atomic_write_bytes(self.path / f"features-{bid}.npz", buf.getvalue(), mode=0o600)


# --------------------------------------------------------------------------- labels


def require_head(model: Any) -> Head:
    """The model's head, or a BundleError saying how to get a bundle with one."""
    head = getattr(model, "head", None)
    if head is None:
        raise BundleError(
            f"{getattr(model, 'name', 'the model')} has no trainable head: it cannot be fine-tuned",
            hint="build it with 'trainable_head: {module: NAME}' in the recipe (docs/finetune.md)",
        )
    return head


def label_key(text: str) -> str:
    """A label as folder names write it: lower case, runs of other characters as one '-'."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def encode_labels(
    y: Sequence[Any] | np.ndarray, labels: list[str], add_classes: bool = False
) -> tuple[np.ndarray, list[str]]:
    """Class indices for ``y`` (indices, or names matched exactly or as slugs) and the label list.

    Names not in ``labels`` are appended (sorted) when ``add_classes``; otherwise they are an error.

    Raises:
        DataError: labels outside the known set, or indices out of range.
    """
    arr = np.asarray(y)
    if arr.dtype.kind in "iu":
        if len(arr) and (arr.min() < 0 or arr.max() >= len(labels)):
            raise DataError(
                f"label indices must lie in [0, {len(labels)}), got {int(arr.min())}..{int(arr.max())}",
                hint="give new classes by name, with add_classes (--add-classes)",
            )
        return arr.astype(np.int64), list(labels)
    names = [str(v) for v in arr.tolist()]
    lookup = {lab: i for i, lab in enumerate(labels)}
    lookup.update(
        {label_key(lab): i for i, lab in enumerate(labels) if label_key(lab) not in lookup}
    )
    unknown = sorted({n for n in names if n not in lookup and label_key(n) not in lookup})
    out_labels = list(labels)
    if unknown:
        if not add_classes:
            raise DataError(
                f"labels outside the model's classes: {', '.join(unknown[:8])}"
                + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""),
                hint=f"known classes: {', '.join(labels)}; pass --add-classes (add_classes=True) to learn new ones",
            )
        for n in unknown:
            lookup[n] = len(out_labels)
            out_labels.append(n)
    idx = [lookup[n] if n in lookup else lookup[label_key(n)] for n in names]
    return np.asarray(idx, np.int64), out_labels


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
    }


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

    Args:
        model: a :class:`~edgesmith.runtime.Model` of a bundle with ``trainable_head``.
        x: samples: uint8 images (preprocessed as the manifest says) or model inputs.
        y: class indices, or label names (names outside the model's labels need ``add_classes``).
        config: a :class:`FinetuneConfig` or dict; ``options`` override single fields
            (``epochs=20, optimizer="sgd"``...).
        add_classes: learn labels the model does not know (new output rows).
        holdout: (x, y) held out for early stopping and the before/after comparison; None holds
            out ``config.val_fraction`` of every class.
        out: write the new bundle version here (see :func:`write_finetuned`).
        sign_key: the device's Ed25519 private key (file or key object) that signs the new bundle.
        cache: a :class:`FeatureCache` (persist features across runs); None: this run only.
        replay: an :class:`~edgesmith.runtime.incremental.ReplayBuffer` of earlier samples'
            features, trained on together with the new data and then updated with it.

    Returns:
        A :class:`FinetuneResult`; ``metrics`` has the held-out accuracy before and after, per
        old and new classes.

    Raises:
        BundleError: the model has no trainable head. DataError: bad labels or data.
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
    rng = np.random.default_rng(cfg.seed)
    start = head0.add_classes(len(labels) - head0.classes, rng, [ft[yt == c] for c in sorted(new)])
    if not cfg.warm_start:
        start = _init_like(start, rng)
    train_x, train_y = ft, yt
    if replay is not None and len(replay):
        rx, ry = replay.arrays(FeatureCache.backbone_id(model), labels)
        train_x, train_y = np.concatenate([ft, rx]), np.concatenate([yt, ry])
    if cfg.normalize:
        start = start.renormalize(*feature_stats(train_x))
    before = evaluate_head(head0, fv, yv)
    teacher = head0(train_x) if cfg.distill > 0 else None  # keeps the old classes' outputs
    result = train_head(start, train_x, train_y, cfg, val=(fv, yv), teacher=teacher)
    after = evaluate_head(result.head, fv, yv)
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
        "replay_samples": len(train_y) - len(yt),
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "optimizer": cfg.optimizer,
        "lr": cfg.learning_rate,
        "weight_decay": cfg.weight_decay,
        "balance": cfg.balance,
        "added_classes": [labels[i] for i in sorted(new)],
    }
    metrics = {
        "holdout_accuracy": after["accuracy"],
        "previous_holdout_accuracy": before["accuracy"],
        "holdout_loss": after["loss"],
        "previous_holdout_loss": before["loss"],
        "per_class": after["per_class"],
        "previous_per_class": before["per_class"],
        "before": _class_groups(before["per_class"], new),
        "after": _class_groups(after["per_class"], new),
        "seconds_per_epoch": result.seconds_per_epoch,
        "stopped_early": result.stopped_early,
        "feature_cache": {"hits": cache.hits, "misses": cache.misses},
    }
    res = FinetuneResult(result.head, labels, metrics, result.history, trained, holdout=(xv, yv))
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
    import tempfile

    from edgesmith.runtime.bundle import write_bundle

    m = model.manifest
    src = Path(model.info.get("path") or "")
    if m is None or not src.is_dir():
        raise BundleError(
            "only a model loaded from a bundle folder can be written as a new version",
            hint="load the bundle folder, not the model file",
        )
    spec = dict(m.trainable_head or {})
    golden_cfg = dict(m.golden or {})
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=".finetune-") as tmp:
        files = {
            rel: src / rel
            for rel in m.files
            if rel not in (spec.get("file"), golden_cfg.get("file"))
        }
        head_path = result.head.save(Path(tmp) / HEAD_FILE)
        files[HEAD_FILE] = head_path
        if golden_cfg.get("file"):
            with np.load(src / str(golden_cfg["file"]), allow_pickle=False) as z:
                g_in, g_old = np.asarray(z["inputs"]), np.asarray(z["outputs"])
            g_out = result.head(model.features(g_in))
            golden_path = Path(tmp) / "golden.npz"
            np.savez(golden_path, inputs=g_in, outputs=g_out)
            files[str(golden_cfg["file"])] = golden_path
            ratio = float(np.abs(g_out).max() or 1.0) / float(np.abs(g_old).max() or 1.0)
            golden_cfg["atol"] = float(golden_cfg.get("atol", 1e-4)) * max(ratio, 1.0)
        doc = m.to_json()
        for k in ("schema", "files", "created"):
            doc.pop(k, None)
        doc["version"] = m.version + 1
        doc["labels"] = result.labels
        doc["outputs"] = [
            {"name": "logits", "shape": ["batch", len(result.labels)], "dtype": "float32"}
        ]
        doc["trainable_head"] = result.head.spec(
            spec.get("feature_output", "features"),
            policy=spec.get("policy", "keep"),
            trained=result.trained,
        )
        if golden_cfg:
            doc["golden"] = golden_cfg
        base_metrics = m.metrics.get("build", m.metrics)
        doc["metrics"] = {
            "metric": "top1",
            "accuracy": result.metrics["holdout_accuracy"],
            "evaluated_on": "device holdout",
            **{
                k: v
                for k, v in result.metrics.items()
                if k not in ("per_class", "previous_per_class")
            },
            "build": base_metrics,
        }
        write_bundle(out, doc, files, sign_key=sign_key)
    return out
