"""Held-out samples kept on the device (``ROOT/local/holdout.npz``, mode 0600, at most
``per_class`` per class): what activating a fine-tuned head and the OTA policy ``keep`` compare
heads on. They never leave the device."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import UpdateError
from edgesmith.fsutil import atomic_write_bytes
from edgesmith.runtime.finetune import FeatureCache, encode_labels

__all__ = [
    "HOLDOUT",
    "PER_CLASS",
    "holdout_features",
    "holdout_names",
    "load_holdout",
    "save_holdout",
]

log = logging.getLogger("edgesmith.devices.ota.local")

HOLDOUT = "local/holdout.npz"
PER_CLASS = 100


def load_holdout(root: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The held-out samples and label names kept on the device, or None."""
    p = Path(root) / HOLDOUT
    if not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            return np.asarray(z["x"]), np.asarray(z["y"]).astype(str)
    except (ValueError, OSError, KeyError) as exc:
        log.warning("ignoring unreadable held-out data %s: %s", p, exc)
        return None


def save_holdout(root: Path, x: np.ndarray, y: np.ndarray, per_class: int) -> None:
    """Keep the newest ``per_class`` samples of each class of ``x``/``y`` (mode 0600)."""
    keep: list[int] = []
    for name in dict.fromkeys(y.tolist()):
        keep += np.flatnonzero(y == name)[-per_class:].tolist()  # the newest per class
    keep.sort()
    buf = io.BytesIO()
    np.savez(buf, x=x[keep], y=y[keep].astype(str))
    atomic_write_bytes(root / HOLDOUT, buf.getvalue(), mode=0o600)


def holdout_names(y: Sequence[Any] | np.ndarray, labels: list[str]) -> np.ndarray:
    """Label names of held-out labels ``y`` (indices into ``labels``, or names/slugs of them)."""
    arr = np.asarray(y)
    if arr.dtype.kind in "iu":
        if len(arr) and (arr.min() < 0 or arr.max() >= len(labels)):
            raise UpdateError(
                "held-out label indices outside the bundle's labels", hint="give label names"
            )
        return np.asarray([labels[i] for i in arr.tolist()], dtype=str)
    idx, _ = encode_labels(arr, labels, add_classes=False)
    return np.asarray([labels[i] for i in idx.tolist()], dtype=str)


def holdout_features(model: Any, x: np.ndarray) -> np.ndarray:
    """Backbone features of held-out samples (no cache: they are few)."""
    return FeatureCache().features(model, x, description="held-out features")
