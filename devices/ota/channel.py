"""The signed channel file: which bundle each target should run, for which share of the fleet.

A store holds one ``<channel>/channel.json`` per channel: a DSSE envelope (see
``edgesmith.runtime.signing``) around this JSON payload::

    {"schema": "edgesmith.channel/1", "channel": "stable", "seq": 1764158400,
     "created": "...", "expires": "...",
     "releases": [{"name": "fmnist-cnn", "version": 3, "target": "x86-cpu",
                   "path": "bundles/fmnist-cnn/fmnist-cnn-3-x86-cpu.tar", "size": 1114624,
                   "sha256": "...", "manifest_sha256": "...", "rollout": 20.0, "published": "..."}]}

Like TUF's timestamp role, ``seq`` only grows (a device refuses a lower one: no replay of old
channel files) and ``expires`` bounds how long a copy stays valid (no freeze attack).
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgesmith.errors import EdgesmithError, UpdateError
from edgesmith.runtime.bundle import parse_utc
from edgesmith.runtime.signing import TrustedKeys, dsse_open, dsse_seal

__all__ = [
    "CHANNEL_FILE",
    "PAYLOAD_TYPE",
    "Channel",
    "Release",
    "in_rollout",
    "iso_utc",
    "open_channel",
    "parse_duration",
    "parse_percent",
    "rollout_bucket",
    "seal_channel",
    "utc_now",
]

CHANNEL_FILE = "channel.json"
PAYLOAD_TYPE = "application/vnd.edgesmith.channel+json"
MAX_CHANNEL_BYTES = 1 << 20
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso_utc(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Release(BaseModel):
    """One bundle offered on a channel for one target."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME)
    version: int = Field(ge=1)
    target: str = Field(pattern=_NAME)
    path: str
    size: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rollout: float = Field(default=100.0, ge=0.0, le=100.0)
    published: str

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        parts = v.split("/")
        if v.startswith("/") or "\\" in v or ":" in v or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"release path must be a plain relative path in the store, got {v!r}")
        return v


class Channel(BaseModel):
    """The payload of a channel file."""

    model_config = ConfigDict(extra="forbid")

    schema_: Literal["edgesmith.channel/1"] = Field(default="edgesmith.channel/1", alias="schema")
    channel: str = Field(pattern=_NAME)
    seq: int = Field(ge=1)
    created: str
    expires: str
    releases: list[Release] = Field(default_factory=list)

    @field_validator("created", "expires")
    @classmethod
    def _time(cls, v: str) -> str:
        parse_utc(v)
        return v

    def expired(self, now: datetime | None = None) -> bool:
        return parse_utc(self.expires) <= (now or utc_now())

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def seal_channel(channel: Channel, key: Any) -> bytes:
    """The channel file bytes: ``channel`` as canonical JSON, signed with ``key``."""
    payload = (json.dumps(channel.to_json(), sort_keys=True, indent=2) + "\n").encode()
    return dsse_seal(payload, PAYLOAD_TYPE, key)


def open_channel(
    data: bytes,
    trusted: TrustedKeys,
    where: str,
    expect: str | None = None,
    now: datetime | None = None,
    allow_expired: bool = False,
) -> Channel:
    """Verify a channel file's signature, then parse it and check name and expiry.

    Raises:
        UpdateError: too large, corrupt, badly or untrustedly signed, another channel, expired.
    """
    if len(data) > MAX_CHANNEL_BYTES:
        raise UpdateError(
            f"{where} is larger than {MAX_CHANNEL_BYTES} bytes", hint="this is not a channel file"
        )
    try:
        payload, _ = dsse_open(data, PAYLOAD_TYPE, trusted, where, error=UpdateError)
    except RecursionError:  # JSON nested thousands deep: not an envelope
        raise UpdateError(
            f"{where} is not a signed envelope (nested too deeply)",
            hint="publish it again with `edgesmith ota publish`",
        ) from None
    try:
        channel = Channel.model_validate(json.loads(payload))
    except (ValueError, ValidationError, RecursionError) as exc:
        first = str(exc).splitlines()[0]
        raise UpdateError(
            f"{where} is signed but malformed: {first}",
            hint="publish it again with a matching edgesmith version",
        ) from None
    if expect is not None and channel.channel != expect:
        raise UpdateError(
            f"{where} is for channel '{channel.channel}', expected '{expect}'",
            hint="check the agent's --channel and the store layout",
        )
    if not allow_expired and channel.expired(now):
        raise UpdateError(
            f"{where} expired at {channel.expires}: a stale copy (freeze attack?) or the "
            "publisher stopped re-signing it",
            hint="the publisher must re-sign it with `edgesmith ota refresh`",
        )
    return channel


def rollout_bucket(device_id: str, name: str, version: int) -> float:
    """A device's place in a release's rollout, uniform in [0, 100): stable per (device, release)."""
    digest = hashlib.sha256(f"{device_id}:{name}:{version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 / 100.0


def in_rollout(device_id: str, release: Release) -> bool:
    """Whether ``device_id`` is among the ``release.rollout`` percent of devices that take it."""
    return rollout_bucket(device_id, release.name, release.version) < release.rollout


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_DURATION_S = 10 * 366 * 86400  # ten years: longer lifetimes defeat the freeze protection


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s`` or ``2w`` as a timedelta (more than 0, at most 10 years).

    Raises:
        EdgesmithError: anything else (a usage error).

    Example:
        >>> parse_duration("30d").days
        30
    """
    m = re.fullmatch(r"\s*(\d{1,30}(?:\.\d{1,9})?)\s*([smhdw])\s*", str(text or ""))
    if not m:
        raise EdgesmithError(
            f"cannot read the duration {text!r}", hint="write a number and a unit: 30d, 12h, 90m"
        )
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not 0 < seconds <= MAX_DURATION_S:
        raise EdgesmithError(
            f"the duration {text!r} is out of range: more than 0 and at most 10 years",
            hint="e.g. 30d",
        )
    return timedelta(seconds=seconds)


def parse_percent(text: str | float) -> float:
    """``20%``, ``20`` or ``100%`` as a float in [0, 100].

    Raises:
        EdgesmithError: anything else (a usage error).
    """
    try:
        value = float(str(text).strip().removesuffix("%"))
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 100.0:  # NaN fails this too
        raise EdgesmithError(
            f"rollout must be a percentage from 0 to 100, got {text!r}", hint="e.g. --rollout 20%"
        )
    return value


def new_channel(name: str, seq: int, expires_in: timedelta, releases: list[Release]) -> Channel:
    now = utc_now()
    return Channel(
        channel=name,
        seq=seq,
        created=iso_utc(now),
        expires=iso_utc(now + expires_in),
        releases=releases,
    )
