"""The agent's memory on the device (``ROOT/state.json``): read defensively, migrated, typed
(:class:`AgentState`, with the open transaction as a :class:`Txn`).

``state.json`` is written only by the agent (atomically), but a device's disk is not a trusted
input: a file from an older version, an edited or damaged one must never stop the agent or make
it act on a half-understood value. :func:`clean_state` keeps each known key only if it has the
right type (logging what it dropped) and migrates old layouts:

- ``channel_seq`` (one number for every channel, before per-channel seqs) becomes
  ``channel_seqs[<channel>]`` for the channel of the last status report, else the configured one.

Keys::

    device_id      str
    channel_seqs   {channel: highest seq seen}      replay protection, per channel
    failed         {"name:version": reason}         versions never retried here
    rolled_back    [manifest sha256, ...]           slots never recovered into (last 16)
    attempts       {"name:version": count}          interrupted installs (crash loops)
    txn            the open transaction (see install.py)
    history        [{name, version, slot, at}, ...]
    fleet_models   {backbone fingerprint: "name:version"}
    last_switch    time.time() of the last switch
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MAX_ROLLED_BACK", "AgentState", "Txn", "clean_state"]

log = logging.getLogger(__name__)

MAX_ROLLED_BACK = 16
_SLOTS = ("a", "b")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str_map(v: Any, value_ok: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and value_ok(x) for k, x in v.items())


def _txn_ok(t: Any) -> bool:
    return (
        isinstance(t, dict)
        and t.get("slot") in _SLOTS
        and isinstance(t.get("name"), str)
        and _int(t.get("version"))
        and t.get("previous_slot") in (*_SLOTS, None)
        and (t.get("previous_version") is None or _int(t.get("previous_version")))
        and isinstance(t.get("undo", ""), str)
        and isinstance(t.get("local", False), bool)
        and isinstance(t.get("revert", False), bool)
    )


_CHECKS: dict[str, Any] = {
    "device_id": lambda v: isinstance(v, str) and 0 < len(v) <= 128 and v.isprintable(),
    "channel_seqs": lambda v: _str_map(v, _int),
    "failed": lambda v: _str_map(v, lambda x: isinstance(x, str)),
    "rolled_back": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "attempts": lambda v: _str_map(v, _int),
    "txn": _txn_ok,
    "history": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
    "fleet_models": lambda v: _str_map(v, lambda x: isinstance(x, str)),
    "last_switch": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def clean_state(raw: Any, channel: str, status_file: Path | None = None) -> dict[str, Any]:
    """``raw`` (parsed ``state.json``) with badly typed known keys dropped and old layouts migrated.

    Unknown keys are kept (a newer version's, or another module's, e.g. ``local.py``).
    """
    if not isinstance(raw, dict):
        if raw is not None:
            log.warning("state.json is not a JSON object; starting with an empty state")
        return {}
    state = dict(raw)
    legacy = state.pop("channel_seq", None)
    for key, ok in _CHECKS.items():
        if key in state and not ok(state[key]):
            log.warning("state.json: dropping the unreadable %r entry", key)
            del state[key]
    if _int(legacy):
        # the old single seq belongs to the channel the device last reported on
        owner = _last_channel(status_file, legacy) or channel
        seqs = state.setdefault("channel_seqs", {})
        seqs[owner] = max(int(seqs.get(owner, 0)), int(legacy))
        log.info("state.json: channel seq %d migrated to channel '%s'", legacy, owner)
    return state


def _last_channel(status_file: Path | None, seq: int) -> str | None:
    if status_file is None:
        return None
    try:
        status = json.loads(status_file.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if isinstance(status, dict) and status.get("channel_seq") == seq:
        ch = status.get("channel")
        return ch if isinstance(ch, str) and ch else None
    return None


@dataclass
class Txn:
    """An open install: written to ``state.json`` before the inactive slot is touched, removed
    when the install is committed or abandoned (the commit point is the switch of ``current``)."""

    slot: str  # the slot being installed
    name: str
    version: int
    previous_slot: str | None = None  # the slot in use before (None: nothing installed)
    previous_version: int | None = None
    local: bool = False  # a bundle made here (a fine-tuned head): never a failed fleet version
    revert: bool = False  # Agent.revert(): back to the model in the other slot
    undo: str = ""  # after the commit point: switching back, for this reason

    @property
    def key(self) -> str:
        """``name:version``, the key of the per-version records (attempts, failures)."""
        return f"{self.name}:{self.version}"

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Txn:
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "slot": self.slot,
            "name": self.name,
            "version": self.version,
            "previous_slot": self.previous_slot,
            "previous_version": self.previous_version,
        }
        doc.update({k: True for k in ("local", "revert") if getattr(self, k)})
        if self.undo:
            doc["undo"] = self.undo
        return doc


@dataclass
class AgentState:
    """What the agent remembers between runs (the keys of ``state.json``, above)."""

    device_id: str = ""
    channel_seqs: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    rolled_back: list[str] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)
    txn: Txn | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    fleet_models: dict[str, str] = field(default_factory=dict)
    last_switch: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept as read

    @classmethod
    def load(cls, raw: Any, channel: str, status_file: Path | None = None) -> AgentState:
        """The state in parsed ``state.json`` ``raw``, cleaned and migrated (:func:`clean_state`)."""
        doc = clean_state(raw, channel, status_file)
        known = {k: doc.pop(k) for k in list(doc) if k in _CHECKS}
        txn = known.pop("txn", None)
        return cls(**known, txn=Txn.from_json(txn) if txn else None, extra=doc)

    def to_json(self) -> dict[str, Any]:
        """The ``state.json`` document."""
        doc: dict[str, Any] = {
            **self.extra,
            "channel_seqs": self.channel_seqs,
            "failed": self.failed,
            "rolled_back": self.rolled_back,
            "attempts": self.attempts,
            "history": self.history,
            "fleet_models": self.fleet_models,
        }
        if self.device_id:
            doc["device_id"] = self.device_id
        if self.last_switch:
            doc["last_switch"] = self.last_switch
        if self.txn is not None:
            doc["txn"] = self.txn.to_json()
        return doc

    def seq(self, channel: str) -> int:
        """The highest seq this device has seen on ``channel`` (0: none)."""
        return int(self.channel_seqs.get(channel, 0))

    def failed_before(self, name: str, version: int) -> bool:
        """Whether ``name`` ``version`` failed here (it is never retried)."""
        return f"{name}:{version}" in self.failed

    def remember_rolled_back(self, digest: str | None) -> None:
        """Record a rolled-back bundle (its manifest's SHA-256) so recovery never switches to it."""
        if not digest:
            return
        seen = [d for d in self.rolled_back if d != digest]
        self.rolled_back = [*seen, digest][-MAX_ROLLED_BACK:]
