"""Tar bundles: the member list screened before any data is read, then every file hashed as it
is read or extracted.

Tar members are regular files and folders only (no links, devices, sparse or contiguous files),
within a member count and a total size (:class:`TarLimits`); absolute paths, ``..`` and unlisted
files are refused. :func:`extract_bundle` writes all or nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from edgesmith.errors import BundleError
from edgesmith.runtime.bundle.files import (
    check_model_references,
    fsync_dir,
    hash_mismatch,
    references_of,
    safe_member,
    size_mismatch,
)
from edgesmith.runtime.bundle.manifest import (
    MANIFEST,
    SIGNATURE,
    Manifest,
    check_rel,
    check_tree,
    parse_manifest,
)
from edgesmith.runtime.bundle.signature import (
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    KeySource,
    check_signature,
    read_limited,
)
from edgesmith.text import printable

__all__ = [
    "DEFAULT_TAR_LIMITS",
    "BundleCheck",
    "TarLimits",
    "extract_bundle",
    "scan_tar",
    "screen_tar_members",
]


@dataclass
class BundleCheck:
    """What verifying a bundle found: its manifest and who signed it."""

    manifest: Manifest
    path: Path
    signed_by: str | None = None  # key id whose signature verified
    signers: list[str] = field(default_factory=list)  # key ids listed in manifest.sig


@dataclass(frozen=True)
class TarLimits:
    """What a tar bundle may hold before anything is extracted.

    Attributes:
        max_members: tar entries (files and folders) at most.
        max_total_bytes: sum of the regular files' sizes at most (what extraction writes).
    """

    max_members: int = 10_000
    max_total_bytes: int = 8 << 30

    @classmethod
    def from_env(cls) -> TarLimits:
        """Defaults, overridden by ``EDGESMITH_BUNDLE_MAX_BYTES`` / ``EDGESMITH_BUNDLE_MAX_MEMBERS``."""
        kw: dict[str, int] = {}
        for env, key in (
            ("EDGESMITH_BUNDLE_MAX_BYTES", "max_total_bytes"),
            ("EDGESMITH_BUNDLE_MAX_MEMBERS", "max_members"),
        ):
            value = os.environ.get(env)
            if value:
                try:
                    kw[key] = int(value)
                except ValueError:
                    raise BundleError(
                        f"{env}={printable(value)} is not an integer", hint=f"unset {env}"
                    ) from None
        return cls(**kw)


DEFAULT_TAR_LIMITS = TarLimits()

_KINDS = {
    tarfile.SYMTYPE: "link",
    tarfile.LNKTYPE: "link",
    tarfile.CHRTYPE: "special file",
    tarfile.BLKTYPE: "special file",
    tarfile.FIFOTYPE: "special file",
    tarfile.CONTTYPE: "contiguous file",
    tarfile.GNUTYPE_SPARSE: "sparse file",
}


def screen_tar_members(
    tf: tarfile.TarFile, where: str, limits: TarLimits | None = None
) -> dict[str, tarfile.TarInfo]:
    """Read a tar's member list and refuse anything but plain files and folders.

    Refused before any data is read: more than ``max_members`` entries, links, devices, FIFOs,
    contiguous and sparse files (a sparse member expands to far more than its archived bytes),
    unsafe paths, a path that is both a file and a folder, duplicates, and regular files whose
    sizes sum to more than ``max_total_bytes``.

    Returns:
        ``{bundle path: member}`` of the regular files.
    """
    limits = limits or TarLimits.from_env()
    members: dict[str, tarfile.TarInfo] = {}
    folders: set[str] = set()
    total = 0
    for n, m in enumerate(tf):
        if n >= limits.max_members:
            raise BundleError(
                f"{where} has more than {limits.max_members} members",
                hint="this is not an edgesmith bundle (or raise EDGESMITH_BUNDLE_MAX_MEMBERS)",
            )
        if m.name in (".", "./"):
            continue
        rel = check_rel(m.name.rstrip("/") if m.isdir() else m.name)
        if m.isdir():
            folders.add(rel)
            continue
        if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or m.sparse is not None:
            kind = _KINDS.get(m.type, "sparse file" if m.sparse is not None else "special file")
            raise BundleError(
                f"{where}: member '{printable(m.name)}' is a {kind}",
                hint="bundles may hold regular files only; links, devices and sparse files "
                "are refused",
            )
        if rel in members:
            raise BundleError(
                f"{where}: member '{printable(rel)}' appears twice", hint="rebuild the bundle"
            )
        total += m.size
        if total > limits.max_total_bytes:
            raise BundleError(
                f"{where} would extract to more than {limits.max_total_bytes} bytes",
                hint="this bundle is larger than this device accepts "
                "(raise EDGESMITH_BUNDLE_MAX_BYTES to take it)",
            )
        members[rel] = m
    check_tree(members, where, folders)
    return members


def scan_tar(
    path: Path,
    trusted_keys: KeySource | None,
    require_signature: bool,
    check_files: bool,
    sink: Callable[[str], IO[bytes]] | None,
    on_file: Callable[[str], None] | None = None,
    limits: TarLimits | None = None,
) -> BundleCheck:
    where = printable(path)
    try:
        with tarfile.open(path, "r:") as tf:
            members = screen_tar_members(tf, where, limits)
            if MANIFEST not in members:
                raise BundleError(f"{where} is not a bundle (no {MANIFEST})", hint="rebuild it")

            def read(name: str, limit: int) -> bytes:
                if members[name].size > limit:
                    raise BundleError(f"{where}: {name} is too large", hint="rebuild the bundle")
                f = tf.extractfile(members[name])
                if f is None:  # not reached: only regular files are in `members`
                    raise BundleError(f"{where}: {name} is not a regular file")
                return read_limited(f, limit, f"{where}/{name}")

            raw = read(MANIFEST, MAX_MANIFEST_BYTES)
            sig = read(SIGNATURE, MAX_SIGNATURE_BYTES) if SIGNATURE in members else None
            signed_by, signers = check_signature(raw, sig, trusted_keys, require_signature, where)
            manifest = parse_manifest(raw, f"{where}/{MANIFEST}")
            if sink:
                for name, data in ((MANIFEST, raw), (SIGNATURE, sig)):
                    if data is not None:
                        mf = sink(name)
                        mf.write(data)
                        mf.close()
            extra = sorted(set(members) - set(manifest.files) - {MANIFEST, SIGNATURE})
            if extra:
                raise BundleError(
                    f"{where} holds files the manifest does not list: {', '.join(extra[:5])}",
                    hint="unlisted files are refused; rebuild the bundle",
                )
            if check_files or sink:
                for rel, entry in sorted(manifest.files.items()):
                    if rel not in members:
                        raise BundleError(
                            f"bundle file '{rel}' is missing from {where}",
                            hint="the bundle is incomplete; download it again",
                        )
                    if members[rel].size != entry.size:
                        raise size_mismatch(rel, members[rel].size, entry)
                    src = tf.extractfile(members[rel])
                    if src is None:
                        raise BundleError(f"{where}: {rel} is not a regular file")
                    h, n = hashlib.sha256(), 0
                    out = sink(rel) if sink else None
                    try:
                        while block := src.read(1 << 20):
                            n += len(block)
                            h.update(block)
                            if out is not None:
                                out.write(block)
                    finally:
                        if out is not None:
                            out.close()
                    if n != entry.size:
                        raise size_mismatch(rel, n, entry)
                    if h.hexdigest() != entry.sha256:
                        raise hash_mismatch(rel)
                    if on_file:
                        on_file(rel)
    except (tarfile.TarError, EOFError) as exc:
        raise BundleError(
            f"{where} is not a readable tar file ({exc})",
            hint="the download is truncated or corrupt; fetch it again",
        ) from None
    return BundleCheck(manifest, path, signed_by, signers)


class _DurableFile:
    """A new file that is fsynced when closed (so a switch never points at unwritten data)."""

    def __init__(self, path: Path, sync: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644
        )
        self._f = os.fdopen(fd, "wb")
        self._sync = sync

    def write(self, data: bytes) -> int:
        return self._f.write(data)

    def close(self) -> None:
        self._f.flush()
        if self._sync:
            os.fsync(self._f.fileno())
        self._f.close()


def extract_bundle(
    tar: str | Path,
    dest: str | Path,
    *,
    trusted_keys: KeySource | None = None,
    require_signature: bool = False,
    fsync: bool = False,
    on_file: Callable[[str], None] | None = None,
    limits: TarLimits | None = None,
) -> Manifest:
    """Verify a ``.tar`` bundle and extract it into the new folder ``dest`` (all or nothing).

    The signature is checked before the manifest is parsed, the member list is screened
    (:func:`screen_tar_members`: regular files only, within
    ``limits``) before any data is read, and every file is hashed as it is written; on any
    failure nothing is left at ``dest``. With ``fsync`` every file and folder is flushed to disk
    before ``dest`` appears. ``on_file`` is called with each bundle path once its file is
    written and checked.

    Raises:
        BundleError: as :func:`verify_bundle`, or ``dest`` already exists.
        OSError: ``dest`` cannot be written (disk full, permissions).
    """
    tar, dest = Path(tar), Path(dest)
    if not (tar.is_file() and tarfile.is_tarfile(tar)):
        raise BundleError(f"{printable(tar)} is not a tar file", hint="give a .tar bundle")
    if dest.exists():
        raise BundleError(
            f"{printable(dest)} already exists", hint="pick another path or remove it first"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    os.chmod(tmp, 0o755)  # readable by a server running as another user, like the files

    def sink(rel: str) -> IO[bytes]:
        return _DurableFile(safe_member(tmp, rel), fsync)  # type: ignore[return-value]

    try:
        check = scan_tar(
            tar, trusted_keys, require_signature, True, sink=sink, on_file=on_file, limits=limits
        )
        check_model_references(tmp, check.manifest, references_of(tmp, check.manifest))
        if fsync:
            for d in sorted({p for p in tmp.rglob("*") if p.is_dir()} | {tmp}, reverse=True):
                fsync_dir(d)
        os.replace(tmp, dest)
        if fsync:
            fsync_dir(dest.parent)
    except BaseException:  # OSErrors (disk full) propagate as such: the OTA agent reports them
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return check.manifest
