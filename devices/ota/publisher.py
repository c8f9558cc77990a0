"""Publish bundles into a static update store: any folder that nginx, S3 or a CDN can serve.

Layout::

    STORE/
      <channel>/channel.json                         signed channel file (the only mutable file)
      bundles/<name>/<name>-<version>-<target>.tar   signed bundles, written once, never changed

Bundles are written before the channel file that points at them, each by a rename, so a device
reading the store at any moment sees a consistent state.

Publishing is a read-modify-write of ``channel.json``. Publishers serialise on an ``flock`` of
``STORE/.edgesmith-publish.lock`` (released by the OS if a publisher dies), and each checks
before its rename that the channel file is still the one it read (compare-and-swap): two
concurrent publishes both land, or one fails loudly instead of silently dropping a release.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgesmith.errors import EdgesmithError, UpdateError
from edgesmith.fsutil import atomic_write_bytes
from edgesmith.runtime.bundle import (
    MANIFEST,
    extract_bundle,
    pack_bundle,
    sha256_file,
    sign_bundle,
    verify_bundle,
)
from edgesmith.runtime.signing import key_id, load_private_key

from .channel import (
    CHANNEL_FILE,
    Channel,
    Release,
    iso_utc,
    new_channel,
    open_channel,
    parse_duration,
    parse_percent,
    utc_now,
)

__all__ = [
    "channel_path",
    "check_channel_name",
    "publish",
    "read_channel",
    "refresh_channel",
    "store_lock",
]

log = logging.getLogger(__name__)


LOCK_FILE = ".edgesmith-publish.lock"
LOCK_WAIT_S = 120.0
_CHANNEL_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


def channel_path(store: Path, channel: str) -> Path:
    return Path(store) / channel / CHANNEL_FILE


def check_channel_name(channel: str) -> str:
    """``channel`` if it is a valid channel name (it becomes a folder and a URL path).

    Raises:
        EdgesmithError: anything but letters, digits, ``.``, ``_`` and ``-`` (1-64, no leading
            punctuation).
    """
    if not isinstance(channel, str) or not re.fullmatch(_CHANNEL_NAME, channel):
        raise EdgesmithError(
            f"invalid channel name {channel!r}",
            hint="use letters, digits, '.', '_' and '-' (e.g. stable, beta-2)",
        )
    return channel


@contextlib.contextmanager
def store_lock(store: Path, wait_s: float | None = None) -> Iterator[None]:
    """Hold the store's publish lock (``flock``; waits up to ``wait_s`` for another publisher,
    default ``LOCK_WAIT_S``).

    Raises:
        UpdateError: another publisher held it for ``wait_s`` seconds.
        EdgesmithError: the store folder cannot be created or written.
    """
    try:
        store.mkdir(parents=True, exist_ok=True)
        f = open(store / LOCK_FILE, "ab")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise EdgesmithError(
            f"cannot write to the store {store}: {exc.strerror or exc}",
            hint="give a writable folder with --store",
        ) from None
    wait_s = LOCK_WAIT_S if wait_s is None else wait_s
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UpdateError(
                        f"another publisher has held {store / LOCK_FILE} for {wait_s:.0f} s",
                        hint="wait for it to finish and publish again (the lock is released "
                        "when that process ends)",
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        f.close()


def _open(
    data: bytes | None, store: Path, channel: str, trusted: dict[str, bytes]
) -> Channel | None:
    if data is None:
        return None
    where = str(channel_path(store, channel))
    return open_channel(data, trusted, where, expect=channel, allow_expired=True)


def _channel_bytes(store: Path, channel: str) -> bytes | None:
    try:
        return channel_path(store, channel).read_bytes()
    except FileNotFoundError:
        return None


def _public_of(key: Any) -> dict[str, bytes]:
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {key_id(raw): raw}


def read_channel(store: Path, channel: str, trusted: dict[str, bytes]) -> Channel | None:
    """The store's current channel (expired or not), or None if there is none yet.

    Raises:
        UpdateError: the channel file exists but is corrupt or signed by another key.
    """
    return _open(_channel_bytes(Path(store), channel), Path(store), channel, trusted)


def _write_channel(store: Path, channel: Channel, key: Any, read: bytes | None) -> None:
    """Replace the channel file, if it still holds ``read`` (the bytes this publish started from).

    Raises:
        UpdateError: someone changed it meanwhile (a publisher that does not take the lock).
    """
    from .channel import seal_channel

    if _channel_bytes(store, channel.channel) != read:
        raise UpdateError(
            f"{channel_path(store, channel.channel)} changed while this publish was running; "
            "nothing was published",
            hint="another publisher wrote it (without the store lock?); publish again",
        )
    atomic_write_bytes(channel_path(store, channel.channel), seal_channel(channel, key))


def _next_seq(old: Channel | None) -> int:
    # wall-clock seconds keep seq growing even if the old channel file is lost or replaced
    return max(int(time.time()), old.seq + 1 if old else 1)


def publish(
    bundle: str | Path,
    store: str | Path,
    channel: str,
    key: str | Path,
    rollout: float = 100.0,
    expires: str = "30d",
    force_channel: bool = False,
) -> tuple[Release, Channel]:
    """Copy a verified, signed bundle into ``store`` and point ``channel`` at it.

    An unsigned bundle is signed with ``key`` on the way in (the source is left as is). Publishing
    the same version again updates its rollout and expiry; a different bundle under a version
    that is already published, or an older version, is refused.

    Args:
        bundle: bundle folder or ``.tar``.
        store: the store folder.
        channel: channel name (``stable``, ``beta``, ...).
        key: the Ed25519 private key file that signs the channel (and unsigned bundles).
        rollout: percentage of devices that take this release (staged rollout).
        expires: how long the channel file stays valid (``30d``); re-sign before then.
        force_channel: replace an unreadable channel file instead of refusing.

    Returns:
        (the release entry, the new channel).

    Raises:
        UpdateError / BundleError: bad bundle, downgrade, version clash, corrupt channel, bad key.
    """
    store, src = Path(store), Path(bundle)
    check_channel_name(channel)
    rollout = parse_percent(rollout)
    priv = load_private_key(key)
    trusted = _public_of(priv)
    lifetime = parse_duration(expires)
    with store_lock(store):
        return _publish_locked(src, store, channel, priv, trusted, rollout, lifetime, force_channel)


def _publish_locked(
    src: Path,
    store: Path,
    channel: str,
    priv: Any,
    trusted: dict[str, bytes],
    rollout: float,
    lifetime: Any,
    force_channel: bool,
) -> tuple[Release, Channel]:
    read = _channel_bytes(store, channel)
    try:
        old = _open(read, store, channel, trusted)
    except UpdateError as exc:
        if not force_channel:
            raise UpdateError(
                f"the store's channel file is unusable: {exc.message}",
                hint="pass --force-channel to replace it (releases in it are dropped)",
            ) from None
        log.warning("replacing unusable channel file: %s", exc.message)
        old = None
    with tempfile.TemporaryDirectory(prefix=".publish-") as tmp:
        folder = Path(tmp) / "bundle"
        if src.is_dir():
            verify_bundle(src)
            shutil.copytree(src, folder)
        elif src.is_file() and tarfile.is_tarfile(src):
            extract_bundle(src, folder)
        else:
            raise UpdateError(
                f"{src} is not a bundle folder or .tar", hint="give a bundle to publish"
            )
        check = verify_bundle(folder, trusted_keys=trusted)
        if check.signed_by is None:
            sign_bundle(folder, priv)
            log.info("signed %s with key %s", src, next(iter(trusted))[:16])
        m = verify_bundle(folder, trusted_keys=trusted, require_signature=True).manifest
        if not re.fullmatch(_CHANNEL_NAME, m.target):  # it names a file in the store
            from .config import printable

            raise EdgesmithError(
                f"{src} is built for target '{printable(m.target)}', which is not a device "
                "profile name",
                hint="rebuild it with --target NAME (see `edgesmith devices list`)",
            )
        if m.expired():
            raise UpdateError(f"{src} expired at {m.expires}", hint="rebuild the bundle")
        releases = list(old.releases) if old else []
        same = [r for r in releases if r.name == m.name and r.target == m.target]
        rel_path = f"bundles/{m.name}/{m.name}-{m.version}-{m.target}.tar"
        dest = store / rel_path
        if same and same[0].version > m.version:
            raise UpdateError(
                f"channel '{channel}' already offers {m.name} version {same[0].version} for "
                f"{m.target}; refusing to publish older version {m.version}",
                hint="devices never downgrade: to undo a release, publish a new, higher version",
            )
        manifest_sha = hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
        if dest.exists():
            # a published bundle is immutable: the same version may only be re-announced
            existing = verify_bundle(dest).manifest
            if (
                hashlib.sha256(canonical_manifest_bytes(dest)).hexdigest() != manifest_sha
                or existing.version != m.version
            ):
                raise UpdateError(
                    f"{m.name} version {m.version} for {m.target} is already published with "
                    "different contents",
                    hint="give the new build a higher version (`edgesmith build --bundle-version`)",
                )
        else:
            packed = pack_bundle(folder, Path(tmp) / "bundle.tar")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(packed, dest.with_name(dest.name + ".tmp"))
            dest.with_name(dest.name + ".tmp").replace(dest)
    release = Release(
        name=m.name,
        version=m.version,
        target=m.target,
        path=rel_path,
        size=dest.stat().st_size,
        sha256=sha256_file(dest),
        manifest_sha256=manifest_sha,
        rollout=rollout,
        published=iso_utc(utc_now()),
    )
    releases = [r for r in releases if not (r.name == m.name and r.target == m.target)]
    releases.append(release)
    releases.sort(key=lambda r: (r.name, r.target))
    new = new_channel(channel, _next_seq(old), lifetime, releases)
    _write_channel(store, new, priv, read)
    return release, new


def canonical_manifest_bytes(tar: Path) -> bytes:
    """The ``manifest.json`` bytes inside a ``.tar`` bundle."""
    with tarfile.open(tar, "r:") as tf:
        f = tf.extractfile(MANIFEST)
        if f is None:
            raise UpdateError(f"{tar} has no {MANIFEST}", hint="the store is damaged")
        return f.read()


def refresh_channel(
    store: str | Path, channel: str, key: str | Path, expires: str = "30d"
) -> Channel:
    """Re-sign a channel with a new expiry and a higher ``seq`` (run it from cron).

    Raises:
        UpdateError: no channel yet, or it is corrupt or signed by another key.
    """
    check_channel_name(channel)
    priv = load_private_key(key)
    lifetime = parse_duration(expires)
    store = Path(store)
    if not channel_path(store, channel).is_file():
        raise UpdateError(
            f"no channel '{channel}' in {store}",
            hint="publish a bundle first: `edgesmith ota publish`",
        )
    with store_lock(store):
        read = _channel_bytes(store, channel)
        old = _open(read, store, channel, _public_of(priv))
        if old is None:
            raise UpdateError(
                f"no channel '{channel}' in {store}",
                hint="publish a bundle first: `edgesmith ota publish`",
            )
        new = new_channel(channel, _next_seq(old), lifetime, list(old.releases))
        _write_channel(store, new, priv, read)
    return new
