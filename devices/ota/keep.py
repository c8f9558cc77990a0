"""The OTA policy ``keep``: when a fleet update arrives, the head fine-tuned here is re-applied
onto the update's backbone (a device-signed bundle, :func:`~edgesmith.runtime.finetune.derive.derive_bundle`)
if the feature sizes match, unless the update's own head is more accurate on the held-out samples
stored on the device, or the local head loses the update's build classes."""

from __future__ import annotations

import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgesmith.errors import BundleError
from edgesmith.runtime import load
from edgesmith.runtime.bundle import Manifest, fsync_dir, read_bundle, verify_bundle
from edgesmith.runtime.finetune.derive import derive_bundle
from edgesmith.runtime.finetune.head import Head, backbone_fingerprint, load_head
from edgesmith.runtime.finetune.memory import check_old_classes, label_accuracy, load_memory

from .config import AgentConfig
from .holdout import holdout_features, load_holdout
from .slots import Slots
from .trust import Trust, is_local_head

__all__ = ["keep_local_head"]

log = logging.getLogger("edgesmith.devices.ota.local")


def keep_local_head(
    slots: Slots, trust: Trust, config: AgentConfig, dest: Path, m: Manifest
) -> Manifest | None:
    """Re-apply the head fine-tuned here onto the update extracted at ``dest`` (policy ``keep``).

    Rewrites ``dest`` (the inactive slot) as a device-signed bundle: the update's files with the
    local head, its labels, and golden outputs recomputed with the new backbone. Returns the new
    manifest, or None when the update's head is installed as is (policy ``replace``, no local
    head, other feature size, the update's head better on the stored held-out samples, or no
    device key to sign with).
    """
    spec = m.trainable_head
    cur_path = slots.current
    try:
        cur = verify_bundle(cur_path, check_files=False).manifest
    except BundleError:
        return None
    if not spec or spec.get("policy") != "keep" or not is_local_head(cur) or cur.name != m.name:
        return None
    assert cur.trainable_head is not None
    local = load_head(cur_path, cur.trainable_head)
    if local.feature_size != spec["feature_size"]:
        log.warning(
            "the update's backbone gives %d features, the local head takes %d: installing the "
            "update's head",
            spec["feature_size"],
            local.feature_size,
        )
        return None
    if trust.device_key is None and config.require_signature:
        log.warning(
            "policy keep, but no device_key to sign the merged bundle: installing the update's head"
        )
        return None
    model = load(dest)
    labels = list(cur.labels or [])
    details: dict[str, Any] = {"kept_over_version": m.version}
    memory = load_memory(dest, spec, m)
    if memory is not None and len(memory.holdout):  # the local head must know the update's classes
        mf = memory.features(model, "holdout")
        theirs = label_accuracy(model.head, list(m.labels or []), mf, memory.names("holdout"))
        check = check_old_classes(memory, mf, local, labels, theirs, "the update's head")
        details["old_classes"] = check.to_json()
        if not check.passed:
            log.warning("%s: installing the update's head", check.message())
            return None
    stored = load_holdout(slots.root)
    if stored is not None:  # keep ours unless the update's head is better on our own data
        feats = holdout_features(model, stored[0])
        ours = label_accuracy(local, labels, feats, stored[1])
        theirs = label_accuracy(model.head, list(m.labels or []), feats, stored[1])
        details.update(holdout_accuracy=ours, update_head_holdout_accuracy=theirs)
        if ours < theirs:
            log.info(
                "the update's head beats the local one on the held-out data (%.4f > %.4f): "
                "installing it",
                theirs,
                ours,
            )
            return None
    return _write_merged(slots, trust, dest, m, cur, local, model, labels, details)


def _write_merged(
    slots: Slots,
    trust: Trust,
    dest: Path,
    m: Manifest,
    cur: Manifest,
    local: Head,
    model: Any,
    labels: list[str],
    details: dict[str, Any],
) -> Manifest:
    trained = dict((cur.trainable_head or {}).get("trained", {}))
    trained.update(
        base_version=m.version,
        backbone=backbone_fingerprint(m),
        kept_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    merged = slots.slots_dir / f".merge-{dest.name}"  # hidden: prepare() removes leftovers
    shutil.rmtree(merged, ignore_errors=True)
    derive_bundle(
        dest,
        m,
        merged,
        head=local,
        features=model.features,
        labels=labels,
        trained=trained,
        metrics={**m.metrics, "local_head": details},
        sign_key=trust.device_key,
        work_dir=slots.slots_dir,
    )
    slots.clear(dest.name)
    os.replace(merged, dest)
    fsync_dir(slots.slots_dir)
    log.info("kept the head fine-tuned here on %s version %s", m.name, m.version)
    return read_bundle(dest)
