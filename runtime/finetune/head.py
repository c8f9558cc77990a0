"""Trainable heads: a linear layer or a small MLP kept as numpy arrays next to an exported backbone.

A bundle with a trainable head (DESIGN.md section 4) holds the *backbone* as its model file (the
network with the head replaced by an identity) and the head's weights in ``head.npz``, described by
``manifest.trainable_head``::

    {"schema": "edgesmith.head/1", "kind": "linear" | "mlp", "file": "head.npz",
     "feature_output": "features", "feature_size": 1280, "classes": 10,
     "layers": [{"type": "linear", "in_features": 1280, "out_features": 10}],
     "normalize": false, "policy": "keep" | "replace", "trained": {...provenance...}}

``head.npz`` holds ``layers.<i>.weight`` (out, in) and ``layers.<i>.bias`` for every linear layer,
and ``norm.mean``/``norm.std`` (feature standardisation, applied first) when ``normalize`` is true.
It is read with ``allow_pickle=False``; shapes, dtypes and finiteness are checked against the spec.
The backbone output is flattened per sample (an ``nn.Flatten`` at the start of a head is implied).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import BundleError
from edgesmith.runtime.bundle.headspec import (
    HEAD_FILE,
    HEAD_SCHEMA,
    POLICIES,
    HeadSpec,
    LayerSpec,
    backbone_fingerprint,
    validate_head_spec,
)
from edgesmith.runtime.specs import TensorSpec

__all__ = [
    "HEAD_FILE",
    "HEAD_SCHEMA",
    "POLICIES",
    "Head",
    "HeadSession",
    "HeadSpec",
    "LayerSpec",
    "backbone_fingerprint",
    "flatten_features",
    "load_head",
    "validate_head_spec",
]

MAX_HEAD_BYTES = 256 << 20
OUTPUT_NAME = "logits"


def flatten_features(x: np.ndarray) -> np.ndarray:
    """Backbone outputs as float32 rows: (N, ...) -> (N, features)."""
    x = np.asarray(x)
    return np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32)


@dataclass
class Head:
    """A head in numpy: optional feature standardisation, then Linear/ReLU/Dropout layers.

    ``params`` maps ``layers.<i>.weight`` (out, in), ``layers.<i>.bias`` and ``norm.mean``/
    ``norm.std`` to float32 arrays. Calling the head on features returns logits (inference:
    dropout off).
    """

    layers: list[LayerSpec]
    params: dict[str, np.ndarray]
    normalize: bool = False
    feature_size: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ shape

    @property
    def classes(self) -> int:
        return int(self.layers[-1].out_features or 0)

    @property
    def kind(self) -> str:
        return "linear" if len(self.layers) == 1 else "mlp"

    def linear_indices(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.type == "linear"]

    def copy(self) -> Head:
        return Head(
            [layer.model_copy() for layer in self.layers],
            {k: v.copy() for k, v in self.params.items()},
            self.normalize,
            self.feature_size,
            dict(self.meta),
        )

    # ------------------------------------------------------------------ compute

    def __call__(self, features: np.ndarray) -> np.ndarray:
        logits, _ = self.forward(flatten_features(features))
        return logits

    def standardise(self, x: np.ndarray) -> np.ndarray:
        if not self.normalize:
            return x
        return ((x - self.params["norm.mean"]) / self.params["norm.std"]).astype(np.float32)

    def forward(
        self, x: np.ndarray, train: bool = False, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, list[Any]]:
        """Logits of flattened features ``x``; with ``train``, the cache :meth:`backward` needs."""
        if x.ndim != 2 or x.shape[1] != self.feature_size:
            raise BundleError(
                f"the head takes {self.feature_size} features per sample, got {list(x.shape[1:])}",
                hint="the backbone does not match this head; rebuild or re-train the head",
            )
        h = self.standardise(x)
        cache: list[Any] = []
        for i, layer in enumerate(self.layers):
            if layer.type == "linear":
                cache.append(h)
                h = h @ self.params[f"layers.{i}.weight"].T + self.params[f"layers.{i}.bias"]
            elif layer.type == "relu":
                cache.append(h > 0)
                h = np.maximum(h, 0)
            else:
                p = float(layer.p or 0.0)
                if train and p > 0:
                    gen = rng or np.random.default_rng()
                    mask = (gen.random(h.shape) >= p).astype(np.float32) / (1 - p)
                    cache.append(mask)
                    h = h * mask
                else:
                    cache.append(None)
        return h.astype(np.float32, copy=False), cache

    def backward(self, cache: list[Any], grad: np.ndarray) -> dict[str, np.ndarray]:
        """Gradients of the parameters given d(loss)/d(logits) and the forward cache."""
        grads: dict[str, np.ndarray] = {}
        for i in range(len(self.layers) - 1, -1, -1):
            layer, c = self.layers[i], cache[i]
            if layer.type == "linear":
                w = self.params[f"layers.{i}.weight"]
                grads[f"layers.{i}.weight"] = grad.T @ c
                grads[f"layers.{i}.bias"] = grad.sum(axis=0)
                if i:
                    grad = grad @ w
            elif layer.type == "relu" or c is not None:
                grad = grad * c
        return grads

    # ------------------------------------------------------------------ edits

    def penultimate(self, x: np.ndarray) -> np.ndarray:
        """What the last linear layer sees for features ``x`` (inference mode)."""
        h = self.standardise(flatten_features(x))
        last = self.linear_indices()[-1]
        for i, layer in enumerate(self.layers[:last]):
            if layer.type == "linear":
                h = h @ self.params[f"layers.{i}.weight"].T + self.params[f"layers.{i}.bias"]
            elif layer.type == "relu":
                h = np.maximum(h, 0)
        return h

    def add_classes(
        self,
        n: int,
        rng: np.random.Generator,
        examples: list[np.ndarray] | None = None,
    ) -> Head:
        """A copy with ``n`` more outputs (old logits are unchanged).

        With ``examples`` (features of a few samples per new class) each new row is *imprinted*
        (Qi et al., 2018): it points at the class's mean penultimate activation, with the norm of
        the existing rows, and a bias that puts it level with the best old class there. Training
        then starts from a sensible few-shot classifier. Without, new rows start small and low.
        """
        out = self.copy()
        if n <= 0:
            return out
        last = self.linear_indices()[-1]
        w, b = out.params[f"layers.{last}.weight"], out.params[f"layers.{last}.bias"]
        scale = float(w.std()) if w.size else 0.01
        new_w = rng.normal(0, scale or 0.01, (n, w.shape[1])).astype(np.float32)
        new_b = np.full(n, float(b.mean()) - 2 * float(b.std() or 1.0), np.float32)
        norm = float(np.linalg.norm(w, axis=1).mean()) if len(w) else 1.0
        for j, ex in enumerate(examples or []):
            if j >= n or ex is None or not len(ex):
                continue
            h = self.penultimate(ex).mean(0)
            length = float(np.linalg.norm(h))
            if length > 0:
                new_w[j] = h / length * norm
                new_b[j] = float((w @ h + b).max() - new_w[j] @ h) if len(w) else 0.0
        out.params[f"layers.{last}.weight"] = np.concatenate([w, new_w])
        out.params[f"layers.{last}.bias"] = np.concatenate([b, new_b])
        layer = out.layers[last]
        out.layers[last] = layer.model_copy(
            update={"out_features": int(layer.out_features or 0) + n}
        )
        return out

    def grow(
        self,
        new_classes: int,
        hidden: int,
        rng: np.random.Generator,
        examples: list[np.ndarray] | None = None,
    ) -> tuple[Head, dict[str, np.ndarray]]:
        """A copy with ``new_classes`` more outputs and ``hidden`` more units in the last hidden
        layer (MLP heads), plus masks of what belongs to the old classes.

        The masks cover every parameter the old classes' logits depend on — the layers before
        the last hidden one, the old hidden units, the old output rows (which read the new units
        with weight 0) — so that :func:`~edgesmith.runtime.finetune.training.train_head` with
        ``frozen=masks`` leaves the old logits exactly as they were on every input, while the new
        classes get units of their own to learn from (parameter isolation; cf. progressive
        networks, Rusu et al., 2016). A linear head has no hidden layer: only its old rows are
        frozen. New output rows start as :meth:`add_classes` makes them (imprinted from
        ``examples``, features of each new class, when given).
        """
        out = self.copy()
        linears = out.linear_indices()
        last = linears[-1]
        if hidden > 0 and len(linears) >= 2:
            h = linears[-2]
            w, b = out.params[f"layers.{h}.weight"], out.params[f"layers.{h}.bias"]
            bound = 1.0 / np.sqrt(w.shape[1])
            out.params[f"layers.{h}.weight"] = np.concatenate(
                [w, rng.uniform(-bound, bound, (hidden, w.shape[1])).astype(np.float32)]
            )
            out.params[f"layers.{h}.bias"] = np.concatenate([b, np.zeros(hidden, np.float32)])
            out.layers[h] = out.layers[h].model_copy(
                update={"out_features": int(out.layers[h].out_features or 0) + hidden}
            )
            wl = out.params[f"layers.{last}.weight"]
            out.params[f"layers.{last}.weight"] = np.concatenate(
                [wl, np.zeros((len(wl), hidden), np.float32)], axis=1
            )
            out.layers[last] = out.layers[last].model_copy(
                update={"in_features": int(out.layers[last].in_features or 0) + hidden}
            )
        old = self.classes
        out = out.add_classes(new_classes, rng, examples) if new_classes > 0 else out
        masks: dict[str, np.ndarray] = {}
        for i in out.linear_indices():
            w = out.params[f"layers.{i}.weight"]
            if i == last:
                rows = np.arange(len(w)) < old
            elif len(linears) >= 2 and i == linears[-2]:
                rows = np.arange(len(w)) < len(self.params[f"layers.{i}.weight"])
            else:
                rows = np.ones(len(w), bool)
            masks[f"layers.{i}.weight"] = np.repeat(rows[:, None], w.shape[1], axis=1)
            masks[f"layers.{i}.bias"] = rows.copy()
        return out, masks

    def renormalize(self, mean: np.ndarray, std: np.ndarray) -> Head:
        """The same function with standardisation by ``mean``/``std`` (exact re-parameterisation).

        With ``z = (f - mean) / std`` the first linear layer becomes ``W diag(std / s0)`` and its
        bias absorbs the shift, so the logits do not change; training then runs on well-scaled
        features.
        """
        out = self.copy()
        mean = np.asarray(mean, np.float64).reshape(-1)
        std = np.asarray(std, np.float64).reshape(-1)
        m0 = self.params["norm.mean"].astype(np.float64) if self.normalize else np.zeros_like(mean)
        s0 = self.params["norm.std"].astype(np.float64) if self.normalize else np.ones_like(std)
        first = self.linear_indices()[0]
        w = self.params[f"layers.{first}.weight"].astype(np.float64)
        b = self.params[f"layers.{first}.bias"].astype(np.float64)
        out.params[f"layers.{first}.weight"] = (w * (std / s0)).astype(np.float32)
        out.params[f"layers.{first}.bias"] = (b + w @ ((mean - m0) / s0)).astype(np.float32)
        out.params["norm.mean"] = mean.astype(np.float32)
        out.params["norm.std"] = std.astype(np.float32)
        out.normalize = True
        return out

    # ------------------------------------------------------------------ files

    def spec(self, feature_output: str, **fields: Any) -> dict[str, Any]:
        """The ``trainable_head`` manifest entry for this head (``fields`` adds policy, trained...)."""
        doc = {
            "schema": HEAD_SCHEMA,
            "kind": self.kind,
            "file": HEAD_FILE,
            "feature_output": feature_output,
            "feature_size": self.feature_size,
            "classes": self.classes,
            "layers": [layer.model_dump(exclude_none=True) for layer in self.layers],
            "normalize": self.normalize,
            **fields,
        }
        return validate_head_spec(doc)

    def to_bytes(self) -> bytes:
        """``head.npz`` contents (no pickled objects)."""
        buf = io.BytesIO()
        arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in self.params.items()}
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    def save(self, path: str | Path) -> Path:
        from edgesmith.fsutil import atomic_write_bytes

        p = Path(path)
        atomic_write_bytes(p, self.to_bytes())
        return p

    @classmethod
    def from_arrays(
        cls, layers: list[LayerSpec], params: dict[str, np.ndarray], normalize: bool = False
    ) -> Head:
        """Build a head from layer specs and arrays, checking every shape."""
        first = next(layer for layer in layers if layer.type == "linear")
        head = cls(
            list(layers),
            {k: np.asarray(v, np.float32) for k, v in params.items()},
            normalize,
            int(first.in_features or 0),
        )
        head._check("head arrays")
        return head

    def _check(self, where: str) -> None:
        want: dict[str, tuple[int, ...]] = {}
        for i, layer in enumerate(self.layers):
            if layer.type == "linear":
                want[f"layers.{i}.weight"] = (
                    int(layer.out_features or 0),
                    int(layer.in_features or 0),
                )
                want[f"layers.{i}.bias"] = (int(layer.out_features or 0),)
        if self.normalize:
            want["norm.mean"] = want["norm.std"] = (self.feature_size,)
        missing = sorted(set(want) - set(self.params))
        extra = sorted(set(self.params) - set(want))
        if missing or extra:
            raise BundleError(
                f"{where}: arrays {missing} missing, {extra} unexpected",
                hint="the head file does not match manifest.trainable_head; rebuild the bundle",
            )
        for k, shape in want.items():
            arr = self.params[k]
            if tuple(arr.shape) != shape:
                raise BundleError(
                    f"{where}: '{k}' has shape {list(arr.shape)}, the manifest says {list(shape)}",
                    hint="the head file does not match manifest.trainable_head; rebuild the bundle",
                )
            if not np.isfinite(arr).all():
                raise BundleError(f"{where}: '{k}' holds NaN or Inf", hint="re-train the head")
        if self.normalize and not (self.params["norm.std"] > 0).all():
            raise BundleError(f"{where}: 'norm.std' must be positive", hint="re-train the head")


def load_head(bundle: str | Path, spec: dict[str, Any]) -> Head:
    """Read a bundle's ``head.npz`` as described by its ``trainable_head`` entry.

    Raises:
        BundleError: a missing, oversized, pickled, or mis-shaped head file.
    """
    s = HeadSpec.model_validate(spec)
    from edgesmith.runtime.bundle.files import safe_member

    path = safe_member(Path(bundle), s.file)
    if not path.is_file():
        raise BundleError(f"head file '{s.file}' is missing", hint="the bundle is incomplete")
    if path.stat().st_size > MAX_HEAD_BYTES:
        raise BundleError(f"head file '{s.file}' is too large", hint="heads are small layers")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except (ValueError, OSError) as exc:
        raise BundleError(
            f"head file '{s.file}' is not a numpy archive of plain arrays ({exc})",
            hint="rebuild the bundle",
        ) from None
    for k, arr in arrays.items():
        if arr.dtype.kind != "f":
            raise BundleError(
                f"head file '{s.file}': '{k}' has dtype {arr.dtype}, expected float32",
                hint="rebuild the bundle",
            )
    head = Head(list(s.layers), arrays, s.normalize, s.feature_size, {"trained": s.trained})
    head.params = {k: v.astype(np.float32, copy=False) for k, v in head.params.items()}
    head._check(f"head file '{s.file}'")
    return head


class HeadSession:
    """A backend session followed by a numpy head: the backbone runs on the backend, the head here.

    It has the session interface (``inputs``, ``outputs``, ``info``, ``run``) so that everything
    built on sessions (``Model.__call__``, ``run_checked``, the server's micro-batching) returns
    logits; ``backbone`` is the wrapped session (``Model.features`` uses it).
    """

    def __init__(self, backbone: Any, head: Head, spec: dict[str, Any]) -> None:
        s = HeadSpec.model_validate(spec)
        names = [o.name for o in backbone.outputs]
        if s.feature_output not in names:
            raise BundleError(
                f"the backbone has outputs {names}; the head reads '{s.feature_output}'",
                hint="the model file does not match manifest.trainable_head; rebuild the bundle",
            )
        self.backbone = backbone
        self.head = head
        self.spec = s
        self._index = names.index(s.feature_output)
        self.inputs: list[TensorSpec] = backbone.inputs
        self.outputs: list[TensorSpec] = [
            TensorSpec(OUTPUT_NAME, ("batch", head.classes), "float32")
        ]
        self.info: dict[str, Any] = {
            **backbone.info,
            "head": {
                "kind": s.kind,
                "feature_size": s.feature_size,
                "classes": s.classes,
                "policy": s.policy,
                "trained_by": s.trained.get("by"),
            },
        }

    def features(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.backbone.run(feeds)[self._index])

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [self.head(self.features(feeds))]
