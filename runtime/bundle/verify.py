"""Verifying a bundle folder or ``.tar``: before anything else in it is used, the Ed25519 signature
over the manifest's bytes (when trusted keys are given or the policy requires one), then that every
listed file has the recorded size and SHA-256, that no path leaves the bundle, and that the model
opens no file the manifest does not list.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from edgesmith.errors import BundleError
from edgesmith.runtime.bundle.files import (
    check_model_references,
    hash_mismatch,
    references_of,
    safe_member,
    sha256_file,
    size_mismatch,
)
from edgesmith.runtime.bundle.manifest import MANIFEST, SIGNATURE, Manifest, parse_manifest
from edgesmith.runtime.bundle.signature import (
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    KeySource,
    check_signature,
    read_limited,
)
from edgesmith.runtime.bundle.tar import BundleCheck, TarLimits, scan_tar

__all__ = ["read_bundle", "verify_bundle"]


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
        return scan_tar(p, trusted_keys, require_signature, check_files, sink=None, limits=limits)
    mpath = p / MANIFEST
    if not p.is_dir() or not mpath.is_file():
        raise BundleError(
            f"{p} is not a bundle (no {MANIFEST})",
            hint="build one with `edgesmith build` or `edgesmith bundle create`",
        )
    with open(mpath, "rb") as f:
        raw = read_limited(f, MAX_MANIFEST_BYTES, str(mpath))
    sig = None
    if (p / SIGNATURE).is_file():
        with open(p / SIGNATURE, "rb") as f:
            sig = read_limited(f, MAX_SIGNATURE_BYTES, str(p / SIGNATURE))
    signed_by, signers = check_signature(raw, sig, trusted_keys, require_signature, str(p))
    manifest = parse_manifest(raw, str(mpath))
    if check_files:
        for rel, entry in manifest.files.items():
            full = safe_member(p, rel)
            if not full.is_file():
                raise BundleError(
                    f"bundle file '{rel}' is missing",
                    hint="the bundle is incomplete; download it again",
                )
            size = full.stat().st_size
            if size != entry.size:
                raise size_mismatch(rel, size, entry)
            if sha256_file(full) != entry.sha256:
                raise hash_mismatch(rel)
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
