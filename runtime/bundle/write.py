"""Writing bundles: a folder atomically (files copied, hashed, the manifest validated and written
last), a reproducible ``.tar`` of it, and signatures added in place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgesmith.errors import BundleError
from edgesmith.runtime.bundle.files import (
    check_model_references,
    references_of,
    safe_member,
    sha256_file,
)
from edgesmith.runtime.bundle.manifest import (
    MANIFEST,
    SCHEMA,
    SIGNATURE,
    Manifest,
    canonical_bytes,
    check_listed,
    check_tree,
)
from edgesmith.runtime.bundle.tar import extract_bundle
from edgesmith.runtime.bundle.verify import verify_bundle
from edgesmith.text import printable

__all__ = ["derived_manifest", "new_manifest", "pack_bundle", "sign_bundle", "write_bundle"]

# set by write_bundle, never by whoever builds the manifest's fields
_WRITTEN = ("schema", "files", "created")


def new_manifest(
    name: str,
    version: int,
    target: str,
    format: str,
    precision: str,
    model: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    *,
    build: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """The fields of a new bundle's manifest, for :func:`write_bundle`: the required ones, ``build``
    stamped with this edgesmith's version, and the optional ``fields`` (``preprocess``,
    ``labels``, ``golden``, ``metrics``, ``expires``, ``trainable_head``) that are not None.

    Example:
        >>> doc = new_manifest("fmnist", 1, "rpi5", "onnx", "int8", "model.onnx", ins, outs,
        ...                    build={"tool": "bundle create"}, labels=None)  # doctest: +SKIP
    """
    from edgesmith import __version__

    doc: dict[str, Any] = {
        "name": name,
        "version": version,
        "target": target,
        "format": format,
        "precision": precision,
        "model": model,
        "inputs": inputs,
        "outputs": outputs,
        "build": {"edgesmith": __version__, **(build or {})},
    }
    doc.update({k: v for k, v in fields.items() if v is not None})
    return doc


def derived_manifest(manifest: Manifest, **changes: Any) -> dict[str, Any]:
    """The fields of ``manifest`` for a new bundle made from it (a new head, a new version), with
    ``changes``: everything but what :func:`write_bundle` sets (schema, files, created)."""
    doc = manifest.to_json()
    for k in _WRITTEN:
        doc.pop(k, None)
    doc.update(changes)
    return doc


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
            dst = safe_member(tmp, rel)
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
        check_listed(validated, "the manifest")
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
