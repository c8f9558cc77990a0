"""What an update check fetches: the signed channel file (refusing a replayed one), the release it
offers this device, and the bundle itself (resumed with HTTP Range, within a deadline and the
device's disk space)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgesmith.errors import EdgesmithError, UpdateError
from edgesmith.runtime.bundle import Manifest

from .channel import CHANNEL_FILE, Channel, Release, open_channel
from .config import AgentConfig
from .download import Deadline, download, fetch
from .slots import Slots
from .state import AgentState

__all__ = [
    "MAX_CHANNEL_BYTES",
    "clean_incoming",
    "download_release",
    "fetch_channel",
    "pick_release",
]

MAX_CHANNEL_BYTES = 1 << 20


def fetch_channel(
    config: AgentConfig,
    trusted: dict[str, bytes] | None,
    state: AgentState,
    deadline: Deadline | None,
) -> tuple[Channel, bool]:
    """The channel file the agent follows, verified and not older than one seen before.

    Returns:
        The channel, and whether its seq is new (``state.channel_seqs`` was raised: save it).

    Raises:
        EdgesmithError: no server configured. UpdateError: unreachable, unsigned, expired or
            replayed channel.
    """
    if not config.server:
        raise EdgesmithError("no update server configured", hint="pass --server URL")
    url = f"{config.server.rstrip('/')}/{config.channel}/{CHANNEL_FILE}"
    data = fetch(url, MAX_CHANNEL_BYTES, config.timeout_s, deadline=deadline)
    channel = open_channel(data, trusted or {}, url, expect=config.channel)
    seen = state.seq(config.channel)  # per channel: moving is no replay
    if channel.seq < seen:
        raise UpdateError(
            f"{url} has seq {channel.seq}, older than the {seen} this device saw before: "
            "a replayed channel file",
            hint="an old channel file is being replayed (or the store was restored from a backup)",
        )
    if channel.seq > seen:
        state.channel_seqs[config.channel] = channel.seq
        return channel, True
    return channel, False


def pick_release(
    channel: Channel, profile: Any, name: str | None, installed: Manifest | None
) -> Release | None:
    """The release ``channel`` offers this device: for its profile (or one whose bundles it runs),
    of model ``name`` (else the installed model's, else the only one offered), the device's own
    target first, then the highest version.

    Raises:
        UpdateError: several models offered and none chosen.
    """
    offers = [r for r in channel.releases if profile.runs_bundles_for(r.target)]
    if name:
        offers = [r for r in offers if r.name == name]
    elif installed is not None and any(r.name == installed.name for r in offers):
        offers = [r for r in offers if r.name == installed.name]
    if not offers:
        return None
    if len({r.name for r in offers}) > 1:
        raise UpdateError(
            f"channel '{channel.channel}' offers several models for {profile.name}: "
            + ", ".join(sorted({r.name for r in offers})),
            hint="set the model to follow (--name or 'name' in agent.yaml)",
        )
    return max(offers, key=lambda r: (r.target == profile.name, r.version))


def clean_incoming(slots: Slots, keep: str | None) -> None:
    """Remove downloads other than those whose name starts with ``keep`` (None: all)."""
    for p in slots.incoming.glob("*"):
        if keep is None or not p.name.startswith(keep):
            p.unlink(missing_ok=True)


def download_release(
    config: AgentConfig,
    slots: Slots,
    r: Release,
    check_deadline: Deadline | None,
    step: Callable[[str], None],
) -> Path:
    """Download release ``r`` into ``ROOT/incoming`` (resuming a ``.part``), hash-checked.

    Raises:
        UpdateError: over the device's size limit, not enough disk space, a failed download.
    """
    if r.size > config.max_bundle_bytes:
        raise UpdateError(
            f"{r.name} version {r.version} is {r.size} bytes, over this device's limit of "
            f"{config.max_bundle_bytes}",
            hint="raise max_bundle_bytes in agent.yaml, or publish a smaller model",
        )
    clean_incoming(slots, keep=r.sha256)
    part = slots.incoming / f"{r.sha256}.part"
    final = part.with_suffix(".tar")
    if final.exists():
        return final  # downloaded before a restart; verified again when installed
    have = part.stat().st_size if part.exists() else 0
    inactive = slots.path(slots.inactive())
    reclaim = (
        sum(f.stat().st_size for f in inactive.rglob("*") if f.is_file())
        if inactive.is_dir()
        else 0
    )
    st = os.statvfs(slots.root)
    free = st.f_bavail * st.f_frsize
    need = 2 * r.size - have - reclaim + (1 << 20)
    if need > free:
        raise UpdateError(
            f"not enough disk space for {r.name} version {r.version}: need {need >> 20} MiB more, "
            f"{free >> 20} MiB free on {slots.root}",
            hint="free space on the device, or publish a smaller model",
        )
    step("download")
    half = [False]

    def progress(n: int) -> None:
        if not half[0] and n >= r.size // 2:
            half[0] = True
            step("download:half")

    url = f"{config.server.rstrip('/')}/{r.path}" if config.server else r.path
    deadline = Deadline(config.download_deadline_s, "download")
    if check_deadline is not None and check_deadline.remaining() < deadline.remaining():
        deadline = check_deadline
    return download(
        url,
        part,
        r.size,
        r.sha256,
        retries=config.download_retries,
        backoff_s=config.retry_backoff_s,
        timeout=config.timeout_s,
        on_bytes=progress,
        deadline=deadline,
        min_rate=config.min_download_rate,
    )
