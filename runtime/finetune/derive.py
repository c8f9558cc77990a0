"""A new bundle from an installed one with another head: the one way fine-tuning (a new version)
and the OTA policy ``keep`` (a fleet update with the head fine-tuned here) write bundles.

The backbone and every other file are copied unchanged (through the manifest's accessor: listed,
inside the bundle, no links); ``head.npz`` is the new head; the golden outputs are recomputed
(same inputs, the backbone plus the new head) with the absolute tolerance scaled to the new
logits; ``labels``, ``outputs``, ``trainable_head`` (with ``trained`` provenance) and
``metrics`` are replaced.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.runtime.bundle.files import member_path
from edgesmith.runtime.bundle.manifest import Manifest
from edgesmith.runtime.bundle.write import derived_manifest, write_bundle
from edgesmith.runtime.finetune.head import HEAD_FILE, OUTPUT_NAME, Head
from edgesmith.runtime.golden import remake_golden

__all__ = ["derive_bundle"]


def derive_bundle(
    src: str | Path,
    manifest: Manifest,
    out: str | Path,
    *,
    head: Head,
    features: Callable[[np.ndarray], np.ndarray],
    labels: list[str],
    trained: dict[str, Any],
    metrics: dict[str, Any],
    version: int | None = None,
    sign_key: Any = None,
    work_dir: str | Path | None = None,
) -> Manifest:
    """Write the bundle ``src`` (with ``manifest``) with ``head`` instead of its head, at ``out``.

    Args:
        src: the bundle folder the backbone comes from.
        manifest: its manifest (verified by whoever loaded it).
        out: the new bundle folder (must not exist; written atomically).
        head: the new head; ``labels`` name its classes.
        features: the backbone of ``src`` (golden inputs -> features), for the new golden outputs.
        trained: the head's provenance (``trainable_head.trained``).
        metrics: the new manifest's ``metrics``.
        version: the new version (None: the same as ``manifest``'s).
        sign_key: sign the new bundle with this private key (file or key object).
        work_dir: where the new head and golden files are written first (None: the system's).

    Returns:
        The new bundle's manifest.

    Raises:
        BundleError: a file of ``src`` is unlisted, unsafe or missing, or ``out`` exists.
    """
    src = Path(src)
    spec = dict(manifest.trainable_head or {})
    skip = {spec.get("file"), (manifest.golden or {}).get("file")}
    files = {rel: member_path(src, manifest, rel) for rel in manifest.files if rel not in skip}
    doc = derived_manifest(manifest)
    with tempfile.TemporaryDirectory(prefix=".derive-", dir=work_dir) as tmp:
        files[HEAD_FILE] = head.save(Path(tmp) / HEAD_FILE)
        golden = remake_golden(src, manifest, lambda x: head(features(x)), tmp)
        if golden is not None:
            path, doc["golden"] = golden
            files[str(doc["golden"]["file"])] = path
        doc.update(
            version=manifest.version if version is None else version,
            labels=list(labels),
            outputs=[{"name": OUTPUT_NAME, "shape": ["batch", head.classes], "dtype": "float32"}],
            trainable_head=head.spec(
                spec.get("feature_output", "features"),
                policy=spec.get("policy", "keep"),
                trained=trained,
                **({"memory": spec["memory"]} if spec.get("memory") else {}),
            ),
            metrics=metrics,
        )
        return write_bundle(out, doc, files, sign_key=sign_key)
