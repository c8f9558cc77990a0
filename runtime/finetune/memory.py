"""What a bundle remembers of the classes it was built with, so that learning on the device does
not forget them (docs/finetune.md, "Keeping the old classes").

A bundle with a trainable head may ship ``memory.npz`` (listed, hashed and signed like every
bundle file, described by ``manifest.trainable_head.memory``):

* ``exemplars`` / ``exemplar_labels``: a few training samples per build class, chosen by herding
  (Welling, 2009; as in iCaRL) so that their mean feature is close to the class's. Fine-tuning
  trains on them together with the new data (replay) and distils the current head on them.
* ``holdout`` / ``holdout_labels``: a few samples per build class from the build's *evaluation*
  data, never trained on, here or in the build. The held-out gate and the OTA health check measure
  the old classes on them: a head that loses more than ``budget`` accuracy there is refused.
* ``class_names``: the build's labels (the labels above index them).

Samples are stored as float16 *model inputs* (``form: inputs``: the backbone computes their
features on the device, and one file serves every backbone variant) or float16 *backbone
features* (``form: features``), whichever is smaller per sample; the build picks. Only plain
arrays, read with ``allow_pickle=False``.

The memory spec is part of :func:`~edgesmith.runtime.finetune.head.backbone_fingerprint`, so a head
fine-tuned on a device keeps the fleet's memory, reference accuracy and budget unchanged (the
device key cannot vouch for different ones).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.lib import format as npformat

from edgesmith.errors import BundleError
from edgesmith.runtime.bundle.headspec import DEFAULT_BUDGET, MEMORY_FILE, MemorySpec

__all__ = [
    "DEFAULT_BUDGET",
    "MEMORY_FILE",
    "Memory",
    "MemorySpec",
    "OldClassCheck",
    "align_weights",
    "check_old_classes",
    "decode_samples",
    "herding",
    "label_accuracy",
    "load_memory",
    "memory_bytes",
]

MAX_MEMORY_BYTES = 64 << 20
MAX_MEMORY_VALUES = 64 << 20  # decompressed float16 values (128 MB): a shipped slice is small


@dataclass
class Memory:
    """A bundle's memory: samples (inputs or features) with class names."""

    spec: MemorySpec
    exemplars: np.ndarray
    exemplar_labels: np.ndarray
    holdout: np.ndarray
    holdout_labels: np.ndarray
    class_names: list[str]

    def features(
        self, model: Any, which: Literal["exemplars", "holdout"], cache: Any = None
    ) -> np.ndarray:
        """Flattened backbone features of the exemplars or the holdout samples (float32)."""
        from edgesmith.runtime.finetune.head import flatten_features

        x = self.exemplars if which == "exemplars" else self.holdout
        if not len(x):
            return np.zeros(
                (0, int(getattr(getattr(model, "head", None), "feature_size", 0))), np.float32
            )
        if self.spec.form == "features":
            return flatten_features(x)
        if cache is None:
            from edgesmith.runtime.finetune.features import FeatureCache

            cache = FeatureCache()
        return cache.features(model, x.astype(np.float32), description=f"memory {which}")

    def names(self, which: Literal["exemplars", "holdout"]) -> np.ndarray:
        y = self.exemplar_labels if which == "exemplars" else self.holdout_labels
        return np.asarray([self.class_names[i] for i in y.tolist()], dtype=str)


def _as_uint8(x: np.ndarray) -> tuple[np.ndarray, float, float] | None:
    """``x`` as ``q * scale + offset`` with uint8 ``q``, when that is exact to float16 precision
    (inputs preprocessed from 8-bit images by one affine map are); else None."""
    x = np.asarray(x, np.float32)
    if not x.size:
        return None
    lo, hi = float(x.min()), float(x.max())
    scale = (hi - lo) / 255 or 1.0
    q = np.clip(np.rint((x - lo) / scale), 0, 255)
    err = float(np.abs(q * scale + lo - x).max())
    if err > 1e-3 * max(abs(lo), abs(hi), 1e-6):
        return None
    return q.astype(np.uint8), scale, lo


def memory_bytes(
    exemplars: np.ndarray,
    exemplar_labels: np.ndarray,
    holdout: np.ndarray,
    holdout_labels: np.ndarray,
    class_names: list[str],
) -> bytes:
    """``memory.npz`` contents (LZMA-compressed): the samples as float16, or as uint8 with a scale and
    an offset when that is exact (model inputs made from 8-bit images: 1 byte a value instead of
    2), int64 labels, and the class names."""
    arrays: dict[str, np.ndarray] = {
        "exemplar_labels": np.asarray(exemplar_labels, np.int64),
        "holdout_labels": np.asarray(holdout_labels, np.int64),
        "class_names": np.asarray(class_names, dtype=str),
    }
    for key, x in (("exemplars", exemplars), ("holdout", holdout)):
        q = _as_uint8(x)
        if q is None:
            arrays[key] = np.ascontiguousarray(x, np.float16)
        else:
            arrays[key] = q[0]
            arrays[f"{key}_scale"] = np.asarray(q[1], np.float32)
            arrays[f"{key}_offset"] = np.asarray(q[2], np.float32)
    # an .npz archive (np.load reads it) compressed with LZMA: 15% smaller than deflate here
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_LZMA) as zf:
        for key, arr in arrays.items():
            with zf.open(f"{key}.npy", "w") as fh:
                npformat.write_array(fh, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_samples(z: Any, key: str, x: np.ndarray) -> np.ndarray:
    """Samples as stored (float16, or uint8 with ``<key>_scale``/``<key>_offset``) as float16.

    Raises:
        BundleError: uint8 samples without a scalar scale and offset.
    """
    if x.dtype != np.uint8:
        return x
    a, b = z.get(f"{key}_scale"), z.get(f"{key}_offset")
    if a is None or b is None or np.shape(a) != () or np.shape(b) != ():
        raise BundleError(
            f"memory file: uint8 '{key}' needs a scale and an offset", hint="rebuild the bundle"
        )
    return (x * np.float32(a) + np.float32(b)).astype(np.float16)


def load_memory(
    bundle: str | Path, head_spec: dict[str, Any] | None, manifest: Any = None
) -> Memory | None:
    """A bundle's memory (None when it ships none).

    With the bundle's ``manifest`` the file is reached through ``bundlefiles.member_path``
    (listed and hashed in the manifest, inside the bundle, not a link); every caller that reads a
    bundle passes it.

    Raises:
        BundleError: an unlisted, missing, oversized or malformed memory file.
    """
    doc = (head_spec or {}).get("memory")
    if not doc:
        return None
    spec = MemorySpec.model_validate(doc)
    from edgesmith.runtime.bundle.files import member_path, safe_member

    if manifest is not None:
        path = member_path(bundle, manifest, spec.file, "memory file")
    else:
        path = safe_member(Path(bundle), spec.file)
    if not path.is_file():
        raise BundleError(f"memory file '{spec.file}' is missing", hint="the bundle is incomplete")
    if path.stat().st_size > MAX_MEMORY_BYTES:
        raise BundleError(f"memory file '{spec.file}' is too large", hint="rebuild the bundle")
    bad = f"memory file '{spec.file}'"
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays: dict[str, np.ndarray] = {}
            for k in ("exemplars", "exemplar_labels", "holdout", "holdout_labels", "class_names"):
                if k not in z.files:
                    raise BundleError(f"{bad} has no '{k}'", hint="rebuild the bundle")
                # the header gives the size before anything is decompressed
                arrays[k] = _bounded(z, k, bad)
            for k in ("exemplars", "holdout"):
                arrays[k] = decode_samples(z, k, arrays[k])
    except (ValueError, OSError, EOFError) as exc:
        raise BundleError(
            f"{bad} is not a numpy archive of plain arrays ({exc})", hint="rebuild the bundle"
        ) from None
    names = [str(s) for s in arrays["class_names"].tolist()]
    for x, y in (("exemplars", "exemplar_labels"), ("holdout", "holdout_labels")):
        xs, ys = arrays[x], arrays[y]
        if xs.dtype != np.float16 or ys.dtype.kind not in "iu" or len(xs) != len(ys):
            raise BundleError(
                f"{bad}: '{x}' must be float16 (or uint8) with one integer label each",
                hint="rebuild the bundle",
            )
        if len(ys) and (ys.min() < 0 or ys.max() >= len(names)):
            raise BundleError(f"{bad}: '{y}' outside the class names", hint="rebuild the bundle")
        if len(xs) and not np.isfinite(xs).all():
            raise BundleError(f"{bad}: '{x}' holds NaN or Inf", hint="rebuild the bundle")
    return Memory(
        spec,
        arrays["exemplars"],
        arrays["exemplar_labels"].astype(np.int64),
        arrays["holdout"],
        arrays["holdout_labels"].astype(np.int64),
        names,
    )


def _bounded(z: Any, key: str, where: str) -> np.ndarray:
    with z.zip.open(f"{key}.npy") as fh:
        version = npformat.read_magic(fh)
        read = (
            npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        )
        shape, _, _ = read(fh)
    if int(np.prod(shape)) > MAX_MEMORY_VALUES:
        raise BundleError(f"{where}: '{key}' is too large", hint="rebuild the bundle")
    return np.asarray(z[key])


# --------------------------------------------------------------------------- selection


def herding(features: np.ndarray, m: int) -> np.ndarray:
    """Indices of ``m`` samples whose running mean best approximates the class mean (iCaRL).

    Greedy: the k-th pick minimises ``|mu - (sum of picks + f) / k|``. Features are L2-normalised
    first, as in iCaRL. Returns fewer indices when the class has fewer samples.
    """
    f = np.asarray(features, np.float64).reshape(len(features), -1)
    m = min(m, len(f))
    if m <= 0:
        return np.zeros(0, np.int64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    mu = f.mean(0)
    picked: list[int] = []
    total = np.zeros_like(mu)
    free = np.ones(len(f), bool)
    for k in range(1, m + 1):
        dist = np.linalg.norm(mu - (total + f) / k, axis=1)
        dist[~free] = np.inf
        i = int(dist.argmin())
        picked.append(i)
        free[i] = False
        total += f[i]
    return np.asarray(picked, np.int64)


# --------------------------------------------------------------------------- training helpers


def align_weights(head: Any, old: int) -> tuple[Any, float]:
    """Weight aligning (Zhao et al., 2020): scale the new classes' output rows so that their mean
    norm equals the old classes'. Training on few old samples leaves the new rows longer, which
    biases predictions towards the new classes; this removes most of that bias without data.

    Returns:
        (a copy of the head, the factor applied to the new rows; 1.0 when nothing to align).
    """
    out = head.copy()
    last = out.linear_indices()[-1]
    w, b = out.params[f"layers.{last}.weight"], out.params[f"layers.{last}.bias"]
    if old <= 0 or old >= len(w):
        return out, 1.0
    norm_old = float(np.linalg.norm(w[:old], axis=1).mean())
    norm_new = float(np.linalg.norm(w[old:], axis=1).mean())
    if norm_new <= 0 or norm_old <= 0:
        return out, 1.0
    gamma = norm_old / norm_new
    if gamma >= 1.0:  # the new rows are not longer: no bias towards them to remove
        return out, 1.0
    w[old:] *= gamma
    b[old:] *= gamma
    return out, gamma


# --------------------------------------------------------------------------- the old-class check


def label_accuracy(head: Any, labels: list[str], features: np.ndarray, names: np.ndarray) -> float:
    """Share of samples whose predicted label is theirs; names compared as slugs (so that a
    class folder 'ankle-boot' and the label 'Ankle boot' are one class)."""
    from edgesmith.runtime.finetune.features import label_key

    if not len(names):
        return float("nan")
    pred = head(features).argmax(1)
    got = [label_key(labels[i]) if i < len(labels) else "" for i in pred.tolist()]
    want = [label_key(str(n)) for n in np.asarray(names).tolist()]
    return float(np.mean([a == b for a, b in zip(got, want, strict=True)]))


@dataclass
class OldClassCheck:
    """Accuracy on the bundle's held-out samples of the build classes, before and after."""

    before: float
    after: float
    samples: int
    classes: int
    budget: float
    reference: str  # what "before" is: the installed head, the head fine-tuned from, the build

    @property
    def drop(self) -> float:
        return self.before - self.after

    @property
    def passed(self) -> bool:
        return self.drop <= self.budget + 1e-9

    def message(self) -> str:
        return (
            f"the fine-tuned head forgets the old classes: accuracy on {self.samples} held-out "
            f"samples of the {self.classes} build classes {self.before:.4f} ({self.reference}) -> "
            f"{self.after:.4f} ({-100 * self.drop:+.1f} points; budget {100 * self.budget:.1f})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "before": self.before,
            "after": self.after,
            "drop": self.drop,
            "samples": self.samples,
            "classes": self.classes,
            "budget": self.budget,
            "reference": self.reference,
            "passed": self.passed,
        }


def check_old_classes(
    memory: Memory,
    features: np.ndarray,
    head: Any,
    labels: list[str],
    before: float,
    reference: str,
    budget: float | None = None,
) -> OldClassCheck:
    """Measure ``head`` on the memory's holdout ``features`` against the accuracy ``before``."""
    names = memory.names("holdout")
    return OldClassCheck(
        before=float(before),
        after=label_accuracy(head, labels, features, names),
        samples=len(names),
        classes=len(set(names.tolist())),
        budget=memory.spec.budget if budget is None else float(budget),
        reference=reference,
    )
