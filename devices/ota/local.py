"""Heads fine-tuned on the device, through the OTA agent's A/B switch (docs/finetune.md).

* :func:`activate` installs a fine-tuned bundle with :meth:`Agent.install_local`: the same
  verify → copy into the inactive slot → health check → switch → commit as an OTA update, plus a
  gate before the switch that refuses the new head if it is less accurate than the installed one
  on the held-out split (the new samples plus those kept from earlier activations). A refusal or
  any failure leaves the installed model in use (``rolled-back``).
* :func:`keep_local_head` is the OTA policy ``keep``: when a fleet update arrives, the head
  fine-tuned here is re-applied onto the update's backbone if the feature sizes match, unless
  the update's own head is more accurate on the held-out samples stored on the device.
* :func:`revert` goes back from a fine-tuned head to the model in the other slot.

Keys: the fleet's release keys (``trusted_keys``) vouch for any bundle. The device's own key
(``device_key``, a private key that never leaves the device) signs what the device makes — a
fine-tuned head, or an update with the local head kept — and is trusted only for bundles whose
files other than the head and golden data are exactly those of a bundle the fleet signed (their
fingerprints are kept in ``state.json``). A stolen device key therefore cannot install a new
backbone, on this device or any other (other devices do not trust it at all).

Held-out samples (``ROOT/local/holdout.npz``, mode 0600, at most ``per_class`` per class) stay
on the device; they are what activation and ``keep`` compare heads on.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgesmith.errors import BundleError, UpdateError
from edgesmith.runtime.bundle import Manifest, fsync_dir, read_bundle, verify_bundle
from edgesmith.runtime.finetune.derive import derive_bundle
from edgesmith.runtime.finetune.head import Head, backbone_fingerprint, load_head
from edgesmith.runtime.finetune.memory import check_old_classes, label_accuracy, load_memory

from .config import UpdateResult

if TYPE_CHECKING:
    from .agent import Agent

__all__ = [
    "Activation",
    "activate",
    "check_local_bundle",
    "keep_local_head",
    "load_device_key",
    "load_holdout",
    "revert",
]

log = logging.getLogger(__name__)

HOLDOUT = "local/holdout.npz"
PER_CLASS = 100


def load_device_key(path: str | Path) -> tuple[Any, dict[str, bytes]]:
    """The device's private key and ``{key id: raw public key}`` for it."""
    from cryptography.hazmat.primitives import serialization

    from edgesmith.runtime.signing import key_id, load_private_key

    key = load_private_key(path)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key, {key_id(raw): raw}


def check_local_bundle(m: Manifest, fleet_models: dict[str, str]) -> None:
    """Refuse a device-made bundle unless it only changes the head of a fleet-published model.

    Raises:
        BundleError: no trainable head made here, or model files the fleet did not publish.
    """
    trained = (m.trainable_head or {}).get("trained", {})
    if trained.get("by") != "device":
        raise BundleError(
            f"{m.name} version {m.version} is signed by this device's key but is not a head "
            "fine-tuned here",
            hint="fleet bundles must be signed with a release key",
        )
    if backbone_fingerprint(m) not in fleet_models:
        raise BundleError(
            f"{m.name} version {m.version} changes more than the head: its model files are not "
            "those of a bundle the fleet published",
            hint="on-device fine-tuning may change only head.npz; rebuild it from the installed bundle",
        )


def _is_local(m: Manifest | None) -> bool:
    return bool(m and (m.trainable_head or {}).get("trained", {}).get("by") == "device")


# --------------------------------------------------------------------------- held-out data


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


def _save_holdout(root: Path, x: np.ndarray, y: np.ndarray, per_class: int) -> None:
    from edgesmith.fsutil import atomic_write_bytes

    keep: list[int] = []
    for name in dict.fromkeys(y.tolist()):
        keep += np.flatnonzero(y == name)[-per_class:].tolist()  # the newest per class
    keep.sort()
    buf = io.BytesIO()
    np.savez(buf, x=x[keep], y=y[keep].astype(str))
    atomic_write_bytes(root / HOLDOUT, buf.getvalue(), mode=0o600)


def _names(y: Sequence[Any] | np.ndarray, labels: list[str]) -> np.ndarray:
    arr = np.asarray(y)
    if arr.dtype.kind in "iu":
        if len(arr) and (arr.min() < 0 or arr.max() >= len(labels)):
            raise UpdateError(
                "held-out label indices outside the bundle's labels", hint="give label names"
            )
        return np.asarray([labels[i] for i in arr.tolist()], dtype=str)
    from edgesmith.runtime.finetune import encode_labels

    idx, _ = encode_labels(arr, labels, add_classes=False)
    return np.asarray([labels[i] for i in idx.tolist()], dtype=str)


def _accuracy(head: Head, labels: list[str], feats: np.ndarray, names: np.ndarray) -> float:
    """Share of samples whose predicted label is theirs (names compared as slugs, so that a
    class added from a folder 'ankle-boot' and a fleet label 'Ankle boot' are one class)."""
    return label_accuracy(head, labels, feats, names)


def _features(model: Any, x: np.ndarray) -> np.ndarray:
    from edgesmith.runtime.finetune import FeatureCache

    return FeatureCache().features(model, x, description="held-out features")


# --------------------------------------------------------------------------- activation


@dataclass
class Activation:
    """The outcome of :func:`activate`: the agent's result and the held-out comparison."""

    result: UpdateResult
    accuracy: float | None = None  # the new head on the held-out split
    previous_accuracy: float | None = None  # the installed head on the same samples
    samples: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    # the build classes on the bundle's held-out memory samples: installed head vs new head
    old_classes: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **self.result.to_json(),
            "holdout_accuracy": self.accuracy,
            "previous_holdout_accuracy": self.previous_accuracy,
            "holdout_samples": self.samples,
            "old_classes": self.old_classes,
        }


def activate(
    agent: Agent,
    bundle: str | Path,
    holdout: tuple[np.ndarray, Sequence[Any] | np.ndarray] | None,
    per_class: int = PER_CLASS,
    budget: float | None = None,
) -> Activation:
    """Install a fine-tuned bundle through the agent's A/B switch, refusing a worse head.

    Two gates run after the health check, before the switch: the old classes (the bundle's
    held-out memory samples of its build classes) may lose at most ``budget`` accuracy against
    the installed head, and the new head must be at least as accurate as the installed one on
    the held-out split (this run's samples plus those kept from earlier activations).

    Args:
        agent: the device's agent (started here if needed).
        bundle: the new bundle version written by ``finetune`` (signed with the device key when
            the agent requires signatures).
        holdout: held-out samples and labels (names or indices into the bundle's labels); they
            are compared together with the samples kept from earlier activations.
        per_class: held-out samples kept per class for later comparisons.
        budget: accuracy the old classes may lose (None: the bundle's
            ``trainable_head.memory.budget``, 0.02 by default).

    Returns:
        An :class:`Activation`; ``result.status`` is ``installed`` or ``rolled-back``/``failed``
        (the installed model untouched).

    Example:
        >>> act = activate(agent, "fmnist-v2", (x_val, y_val))    # doctest: +SKIP
        >>> act.result.status, act.accuracy, act.previous_accuracy  # doctest: +SKIP
    """
    agent.start()
    new_m = read_bundle(bundle, verify=False)
    labels = list(new_m.labels or [])
    xs, ys = [], []
    stored = load_holdout(agent.slots.root)
    if holdout is not None and len(holdout[0]):
        x_new = np.asarray(holdout[0])
        xs.append(x_new)
        ys.append(_names(holdout[1], labels))
        if (
            stored is not None
            and stored[0].shape[1:] == x_new.shape[1:]
            and stored[0].dtype == x_new.dtype
        ):
            xs.insert(0, stored[0])
            ys.insert(0, stored[1])
    elif stored is not None:
        xs, ys = [stored[0]], [stored[1]]
    act = Activation(UpdateResult("failed"))
    if not xs:
        m = agent.installed()
        act.result = UpdateResult(
            "failed",
            m.version if m else None,
            new_m.version,
            name=new_m.name,
            reason="no held-out samples to compare the new head with the installed one",
        )
        return act
    x, y = np.concatenate(xs), np.concatenate(ys)
    act.samples = len(y)

    def gate(dest: Path, m: Manifest) -> None:
        from edgesmith.runtime import load

        installed = agent.installed()
        if installed is None or installed.trainable_head is None:
            raise UpdateError("the installed model has no trainable head", hint="install one first")
        if backbone_fingerprint(m) != backbone_fingerprint(installed):
            raise UpdateError(
                "the fine-tuned bundle's backbone differs from the installed one",
                hint="fine-tune the installed bundle (ROOT/current)",
            )
        model = load(dest)
        current = load_head(agent.current_path, installed.trainable_head)
        memory = load_memory(dest, m.trainable_head, m)
        if memory is not None and len(memory.holdout):  # the old task first
            mf = memory.features(model, "holdout")
            names = memory.names("holdout")
            before = label_accuracy(current, list(installed.labels or []), mf, names)
            check = check_old_classes(
                memory, mf, model.head, list(m.labels or []), before, "installed head", budget
            )
            act.old_classes = check.to_json()
            if not check.passed:
                raise UpdateError(
                    check.message(),
                    hint="the installed model stays; fine-tune with the bundle's memory "
                    "(the default) or with fewer epochs / a lower learning rate",
                )
        feats = _features(model, x)
        act.accuracy = _accuracy(model.head, list(m.labels or []), feats, y)
        act.previous_accuracy = _accuracy(current, list(installed.labels or []), feats, y)
        if act.accuracy < act.previous_accuracy:
            raise UpdateError(
                f"the fine-tuned head is worse on the held-out split: {act.accuracy:.4f} < "
                f"{act.previous_accuracy:.4f} (installed, {len(y)} samples)",
                hint="train on more or cleaner data; the installed model stays",
            )

    act.result = agent.install_local(bundle, gate=gate)
    if act.result.status == "installed":
        _save_holdout(agent.slots.root, x, y, per_class)
    return act


def revert(agent: Agent) -> UpdateResult:
    """Go back from a head fine-tuned here to the model in the other slot (if it is healthy).

    Raises:
        UpdateError: the model in use is not a local fine-tune, or there is nothing to go back to.
    """
    import time

    agent.start()
    cur = agent.installed()
    if not _is_local(cur) or cur is None:
        raise UpdateError(
            "the model in use is not a head fine-tuned on this device", hint="nothing to revert"
        )
    other = agent.slots.inactive()
    try:
        prev = verify_bundle(agent.slots.path(other), check_files=False).manifest
    except BundleError:
        prev = None
    if prev is None or prev.name != cur.name or not agent._slot_ok(other):
        raise UpdateError(
            "no healthy previous version of this model to go back to",
            hint="the other slot is empty, another model, or fails its checks",
        )
    agent.slots.switch(other)
    agent.state["last_switch"] = time.time()
    agent.slots.write_state(agent.state)
    result = UpdateResult(
        "rolled-back", prev.version, None, cur.version, cur.name, "reverted the fine-tuned head"
    )
    agent.slots.write_status({**agent.status(), **result.to_json()})
    return result


# --------------------------------------------------------------------------- OTA policy "keep"


def keep_local_head(agent: Agent, dest: Path, m: Manifest) -> Manifest | None:
    """Re-apply the head fine-tuned here onto the update extracted at ``dest`` (policy ``keep``).

    Rewrites ``dest`` (the inactive slot) as a device-signed bundle: the update's files with the
    local head, its labels, and golden outputs recomputed with the new backbone. Returns the new
    manifest, or None when the update's head is installed as is (policy ``replace``, no local
    head, other feature size, the update's head better on the stored held-out samples, or no
    device key to sign with).
    """
    spec = m.trainable_head
    cur_path = agent.current_path
    try:
        cur = verify_bundle(cur_path, check_files=False).manifest
    except BundleError:
        return None
    if not spec or spec.get("policy") != "keep" or not _is_local(cur) or cur.name != m.name:
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
    if agent._device_key is None and agent.config.require_signature:
        log.warning(
            "policy keep, but no device_key to sign the merged bundle: installing the update's head"
        )
        return None
    from edgesmith.runtime import load

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
    stored = load_holdout(agent.slots.root)
    if stored is not None:  # keep ours unless the update's head is better on our own data
        feats = _features(model, stored[0])
        ours = _accuracy(local, labels, feats, stored[1])
        theirs = _accuracy(model.head, list(m.labels or []), feats, stored[1])
        details.update(holdout_accuracy=ours, update_head_holdout_accuracy=theirs)
        if ours < theirs:
            log.info(
                "the update's head beats the local one on the held-out data (%.4f > %.4f): "
                "installing it",
                theirs,
                ours,
            )
            return None
    return _write_merged(agent, dest, m, cur, local, model, labels, details)


def _write_merged(
    agent: Agent,
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
    merged = agent.slots.slots_dir / f".merge-{dest.name}"  # hidden: prepare() removes leftovers
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
        sign_key=agent._device_key,
        work_dir=agent.slots.slots_dir,
    )
    agent.slots.clear(dest.name)
    os.replace(merged, dest)
    fsync_dir(agent.slots.slots_dir)
    log.info("kept the head fine-tuned here on %s version %s", m.name, m.version)
    return read_bundle(dest)
