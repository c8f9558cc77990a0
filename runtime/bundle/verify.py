"""Deploy bundles: a folder (or a ``.tar`` of it) holding ``manifest.json``, the model file(s) and
``manifest.sig`` (DESIGN.md section 4).

The manifest is stored in canonical form (sorted keys, two-space indent, UTF-8, trailing newline)
so that its exact bytes are what a signature covers. Reading a bundle checks, before anything
else in it is used: the Ed25519 signature over those bytes (when trusted keys are given or the
policy requires one), then that every listed file has the recorded size and SHA-256 and that no
path leaves the bundle. Tar bundles are checked member by member; links, special files,
absolute paths, ``..`` and unlisted files are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgesmith.errors import BundleError
from edgesmith.runtime.bundle.files import (
    TarLimits,
    check_model_references,
    check_rel,
    check_tree,
    printable,
    references_of,
    safe_member,
    screen_tar_members,
)

__all__ = [
    "MANIFEST",
    "SCHEMA",
    "SIGNATURE",
    "BundleCheck",
    "FileEntry",
    "Manifest",
    "canonical_bytes",
    "extract_bundle",
    "fsync_dir",
    "pack_bundle",
    "parse_utc",
    "read_bundle",
    "sha256_file",
    "sign_bundle",
    "verify_bundle",
    "write_bundle",
]

log = logging.getLogger(__name__)

SCHEMA = "edgesmith.bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MAX_MANIFEST_BYTES = 4 << 20
MAX_SIGNATURE_BYTES = 64 << 10
KeySource = Mapping[str, bytes] | Iterable[str | Path]


def parse_utc(text: str) -> datetime:
    """Parse an ISO-8601 time (``2026-11-26T12:00:00Z``); naive times are taken as UTC."""
    t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Manifest(BaseModel):
    """The manifest of a bundle (DESIGN.md section 4)."""

    model_config = ConfigDict(extra="forbid")

    schema_: Literal["edgesmith.bundle/1"] = Field(default="edgesmith.bundle/1", alias="schema")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    version: int = Field(ge=1)
    created: str
    expires: str | None = None
    target: str
    format: Literal["onnx", "tflite", "openvino"]
    precision: str
    model: str
    files: dict[str, FileEntry]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    preprocess: dict[str, Any] | None = None
    labels: list[str] | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    golden: dict[str, Any] | None = None
    trainable_head: dict[str, Any] | None = None
    build: dict[str, Any] = Field(default_factory=dict)

    @field_validator("inputs", "outputs")
    @classmethod
    def _tensor_specs(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, spec in enumerate(v):
            if not isinstance(spec.get("name"), str) or not isinstance(spec.get("dtype"), str):
                raise ValueError(f"entry {i} needs a 'name' and a 'dtype' string")
            shape = spec.get("shape")
            if not isinstance(shape, list) or not all(
                isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                for d in shape
            ):
                raise ValueError(f"entry {i}: 'shape' must be a list of sizes or names")
        return v

    @field_validator("golden")
    @classmethod
    def _golden(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        if "file" in v and not isinstance(v["file"], str):
            raise ValueError("'file' must be a bundle path")
        for key in ("atol", "rtol"):
            x = v.get(key, 0.0)
            if isinstance(x, bool) or not isinstance(x, int | float) or not 0 <= x < math.inf:
                raise ValueError(f"'{key}' must be a non-negative number")
        if not isinstance(v.get("top1", False), bool):
            raise ValueError("'top1' must be true or false")
        return v

    @field_validator("preprocess")
    @classmethod
    def _preprocess(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            from edgesmith.runtime.specs import validate_preprocess

            validate_preprocess(v)
        return v

    @field_validator("trainable_head")
    @classmethod
    def _head_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # schema edgesmith.head/1, defined with the head code (runtime/head.py)
        from edgesmith.runtime.head import validate_head_spec

        return None if v is None else validate_head_spec(v)

    @field_validator("expires")
    @classmethod
    def _iso_time(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_utc(v)
            except ValueError:
                raise ValueError(f"not an ISO-8601 time: {v!r}") from None
        return v

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def expired(self, now: datetime | None = None) -> bool:
        """Whether ``expires`` lies in the past."""
        return self.expires is not None and parse_utc(self.expires) <= (
            now or datetime.now(timezone.utc)
        )


@dataclass
class BundleCheck:
    """What verifying a bundle found: its manifest and who signed it."""

    manifest: Manifest
    path: Path
    signed_by: str | None = None  # key id whose signature verified
    signers: list[str] = field(default_factory=list)  # key ids listed in manifest.sig


def canonical_bytes(manifest: dict[str, Any]) -> bytes:
    """The exact bytes of ``manifest.json``; a signature covers these bytes."""
    return (
        json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    ).encode("utf-8")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_check_rel = check_rel  # the old private names, used by other runtime modules
_safe_member = safe_member


def _trusted(keys: KeySource | None) -> Mapping[str, bytes] | None:
    if keys is None or isinstance(keys, Mapping):
        return keys
    from edgesmith.runtime.signing import load_trusted_keys

    return load_trusted_keys(keys)


def _check_signature(
    raw: bytes,
    sig: bytes | None,
    trusted_keys: KeySource | None,
    require_signature: bool,
    where: str,
) -> tuple[str | None, list[str]]:
    """Verify ``manifest.sig`` over the raw manifest bytes, before the manifest is parsed."""
    signers: list[str] = []
    if sig is not None:
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            signers = [str(r["keyid"]) for r in json.loads(sig)["signatures"]]
    trusted = _trusted(trusted_keys)
    if sig is None:
        if require_signature:
            raise BundleError(
                f"{where} is not signed, and this device accepts signed bundles only",
                hint="sign it with `edgesmith bundle sign BUNDLE --key NAME.key`",
            )
        if trusted:
            log.warning("%s is an unsigned development bundle", where)
        return None, signers
    if not trusted:
        if require_signature:
            raise BundleError(
                f"cannot check the signature of {where}: no trusted public key was given",
                hint="pass the publisher's NAME.pub (--key, or the agent's trusted_keys)",
            )
        return None, signers
    from edgesmith.runtime.signing import verify_document

    return verify_document(raw, sig, trusted, f"{where}/{SIGNATURE}"), signers


def _parse_manifest(raw: bytes, where: str) -> Manifest:
    try:
        manifest = Manifest.model_validate(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(
            f"{where} is not valid JSON: {exc}", hint="the bundle is corrupt; download it again"
        ) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise BundleError(
            f"{where}: '{printable(loc)}': {printable(err['msg'])}",
            hint="the manifest does not follow schema edgesmith.bundle/1",
        ) from None
    _check_listed(manifest, where)
    return manifest


def _check_listed(manifest: Manifest, where: str) -> None:
    """Every path the manifest names is listed in ``files``; the paths form a clean tree."""
    for rel in manifest.files:
        if check_rel(rel) in (MANIFEST, SIGNATURE):
            raise BundleError(
                f"manifest lists its own '{rel}' as a file", hint="rebuild the bundle"
            )
    if manifest.model not in manifest.files:
        raise BundleError(
            f"manifest names model file '{printable(manifest.model)}' but does not list it in 'files'",
            hint="rebuild the bundle",
        )
    for what, named in (
        ("head file", (manifest.trainable_head or {}).get("file")),
        ("golden file", (manifest.golden or {}).get("file")),
        ("memory file", ((manifest.trainable_head or {}).get("memory") or {}).get("file")),
    ):
        if named is not None and named not in manifest.files:
            raise BundleError(
                f"manifest names {what} '{printable(named)}' but does not list it in 'files'",
                hint="every file a bundle uses must be listed and hashed; rebuild the bundle",
            )
    check_tree(manifest.files, where)


def _mismatch(rel: str, size: int, entry: FileEntry) -> BundleError:
    return BundleError(
        f"bundle file '{rel}' has {size} bytes, the manifest says {entry.size}",
        hint="the file is truncated or altered; download the bundle again",
    )


def _bad_hash(rel: str) -> BundleError:
    return BundleError(
        f"bundle file '{rel}' does not match its SHA-256 in the manifest",
        hint="the file was altered or corrupted; download the bundle again",
    )


def _read_limited(f: IO[bytes], limit: int, where: str) -> bytes:
    data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleError(
            f"{where} is larger than {limit} bytes", hint="this is not an edgesmith bundle"
        )
    return data


def verify_bundle(
    path: str | Path,
    *,
    trusted_keys: KeySource | None = None,
    require_signature: bool = False,
    check_files: bool = True,
    limits: TarLimits | None = None,
) -> BundleCheck:
    """Verify a bundle folder or ``.tar`` and report its manifest and signer.

    Args:
        path: bundle folder or ``.tar`` file.
        trusted_keys: ``{key id: raw public key}`` or public key files / folders of ``*.pub``.
            When given, a present signature must verify against one of them.
        require_signature: refuse unsigned bundles (a device policy).
        check_files: check every listed file's size and SHA-256 and, for a folder, that every
            file the model opens (ONNX external data, OpenVINO weights) is listed.
        limits: member count and total size a tar may hold (default: :class:`TarLimits`).

    Raises:
        BundleError: not a bundle, bad or untrusted signature, unsafe paths, size or hash
            mismatch, a file the model uses that is not listed, a tar over its limits.
    """
    p = Path(path)
    if p.is_file() and tarfile.is_tarfile(p):
        return _scan_tar(p, trusted_keys, require_signature, check_files, sink=None, limits=limits)
    mpath = p / MANIFEST
    if not p.is_dir() or not mpath.is_file():
        raise BundleError(
            f"{p} is not a bundle (no {MANIFEST})",
            hint="build one with `edgesmith build` or `edgesmith bundle create`",
        )
    with open(mpath, "rb") as f:
        raw = _read_limited(f, MAX_MANIFEST_BYTES, str(mpath))
    sig = None
    if (p / SIGNATURE).is_file():
        with open(p / SIGNATURE, "rb") as f:
            sig = _read_limited(f, MAX_SIGNATURE_BYTES, str(p / SIGNATURE))
    signed_by, signers = _check_signature(raw, sig, trusted_keys, require_signature, str(p))
    manifest = _parse_manifest(raw, str(mpath))
    if check_files:
        for rel, entry in manifest.files.items():
            full = _safe_member(p, rel)
            if not full.is_file():
                raise BundleError(
                    f"bundle file '{rel}' is missing",
                    hint="the bundle is incomplete; download it again",
                )
            size = full.stat().st_size
            if size != entry.size:
                raise _mismatch(rel, size, entry)
            if sha256_file(full) != entry.sha256:
                raise _bad_hash(rel)
        check_model_references(p, manifest, references_of(p, manifest))
    return BundleCheck(manifest, p, signed_by, signers)


def read_bundle(
    path: str | Path,
    verify: bool = True,
    *,
    trusted_keys: KeySource | None = None,
    require_signature: bool = False,
) -> Manifest:
    """Read and verify a bundle's manifest and files (folder or ``.tar``).

    Without ``trusted_keys`` and ``require_signature`` a signature is not checked (what
    ``runtime.load`` does with a bundle the OTA agent already verified).

    Raises:
        BundleError: missing or malformed manifest, bad signature, unsafe paths, missing files,
            size or hash mismatch.
    """
    return verify_bundle(
        path, trusted_keys=trusted_keys, require_signature=require_signature, check_files=verify
    ).manifest


# --------------------------------------------------------------------------- tar bundles


def _scan_tar(
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
                return _read_limited(f, limit, f"{where}/{name}")

            raw = read(MANIFEST, MAX_MANIFEST_BYTES)
            sig = read(SIGNATURE, MAX_SIGNATURE_BYTES) if SIGNATURE in members else None
            signed_by, signers = _check_signature(raw, sig, trusted_keys, require_signature, where)
            manifest = _parse_manifest(raw, f"{where}/{MANIFEST}")
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
                        raise _mismatch(rel, members[rel].size, entry)
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
                        raise _mismatch(rel, n, entry)
                    if h.hexdigest() != entry.sha256:
                        raise _bad_hash(rel)
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


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    (:func:`~edgesmith.runtime.bundle.files.screen_tar_members`: regular files only, within
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
        return _DurableFile(_safe_member(tmp, rel), fsync)  # type: ignore[return-value]

    try:
        check = _scan_tar(
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


def pack_bundle(src: str | Path, out: str | Path) -> Path:
    """Verify a bundle folder and write it as a reproducible ``.tar`` (manifest first).

    Raises:
        BundleError: the folder fails verification, or ``out`` exists.
    """
    src, out = Path(src), Path(out)
    check = verify_bundle(src)
    if out.exists():
        raise BundleError(f"{out} already exists", hint="pick another path or remove it first")
    names = [MANIFEST] + ([SIGNATURE] if (src / SIGNATURE).is_file() else [])
    names += sorted(check.manifest.files)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = (src / name).stat().st_size
                info.mode, info.mtime, info.uid, info.gid = 0o644, 0, 0, 0
                with open(src / name, "rb") as f:
                    tf.addfile(info, f)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


def _sign_folder(root: Path, key: Any) -> str:
    from edgesmith.runtime.signing import key_id, sign_document

    verify_bundle(root)  # never sign files that do not match their manifest
    raw = (root / MANIFEST).read_bytes()
    sig_path = root / SIGNATURE
    existing = sig_path.read_bytes() if sig_path.is_file() else None
    doc = sign_document(raw, key, existing)
    fd, tmp = tempfile.mkstemp(prefix=f".{SIGNATURE}.", dir=root)
    with os.fdopen(fd, "wb") as f:
        f.write(doc)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, sig_path)
    from cryptography.hazmat.primitives import serialization

    raw_pub = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return key_id(raw_pub)


def sign_bundle(path: str | Path, key: str | Path | Any) -> str:
    """Sign a bundle folder or ``.tar`` in place with an Ed25519 private key (file or key object).

    Other signatures are kept (key rotation); a signature by the same key is replaced.

    Returns:
        The key id of the signing key.

    Example:
        >>> sign_bundle("out/bundles/fmnist-cnn-onnx-fp32", "keys/release.key")  # doctest: +SKIP
    """
    from edgesmith.runtime.signing import load_private_key

    p = Path(path)
    k = load_private_key(key) if isinstance(key, str | Path) else key
    if p.is_dir():
        return _sign_folder(p, k)
    if not (p.is_file() and tarfile.is_tarfile(p)):
        raise BundleError(f"{p} is not a bundle folder or .tar", hint="give a bundle to sign")
    with tempfile.TemporaryDirectory(prefix=".sign-", dir=p.parent) as tmp:
        folder = Path(tmp) / "b"
        extract_bundle(p, folder)
        kid = _sign_folder(folder, k)
        packed = pack_bundle(folder, Path(tmp) / "b.tar")
        os.replace(packed, p)
    return kid


def write_bundle(
    out: str | Path,
    manifest: dict[str, Any],
    files: dict[str, Path],
    *,
    sign_key: str | Path | Any | None = None,
) -> Manifest:
    """Write a bundle folder atomically: copy ``files`` (bundle path -> source), hash them, write the manifest.

    ``manifest`` holds every field but ``schema`` and ``files``, which are filled in here. With
    ``sign_key`` (a private key file or key object) the bundle is signed before it appears.
    """
    out = Path(out)
    if out.exists():
        raise BundleError(
            f"{printable(out)} already exists", hint="pick another path or remove it first"
        )
    check_tree(files, "the bundle")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        entries: dict[str, dict[str, Any]] = {}
        for rel, src in files.items():
            dst = _safe_member(tmp, rel)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            entries[rel] = {"sha256": sha256_file(dst), "size": dst.stat().st_size}
        doc = {
            "schema": SCHEMA,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **manifest,
            "files": entries,
        }
        try:
            validated = Manifest.model_validate(doc)
        except ValidationError as exc:
            raise BundleError(
                f"invalid manifest: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
            ) from None
        _check_listed(validated, "the manifest")
        # never write (or sign) a bundle whose model opens files it does not hold
        check_model_references(tmp, validated, references_of(tmp, validated))
        (tmp / MANIFEST).write_bytes(canonical_bytes(validated.to_json()))
        if sign_key is not None:
            sign_bundle(tmp, sign_key)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return validated
