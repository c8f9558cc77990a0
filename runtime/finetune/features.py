"""What fine-tuning trains on: backbone features (computed once per sample, optionally cached on
disk) and labels (indices, or names matched exactly or as folder-style slugs)."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import BundleError, DataError
from edgesmith.progress import track
from edgesmith.runtime.finetune.head import Head, backbone_fingerprint, flatten_features

__all__ = ["FeatureCache", "encode_labels", "label_key", "require_head"]

log = logging.getLogger(__name__)


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
