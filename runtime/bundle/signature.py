"""A bundle's signature (``manifest.sig``), checked over the raw manifest bytes before the manifest
is parsed (runtime/signing.py holds the Ed25519 format)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO

from edgesmith.errors import BundleError
from edgesmith.runtime.bundle.manifest import SIGNATURE

__all__ = [
    "MAX_MANIFEST_BYTES",
    "MAX_SIGNATURE_BYTES",
    "KeySource",
    "check_signature",
    "read_limited",
    "trusted",
]

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 4 << 20
MAX_SIGNATURE_BYTES = 64 << 10
KeySource = Mapping[str, bytes] | Iterable[str | Path]


def trusted(keys: KeySource | None) -> Mapping[str, bytes] | None:
    if keys is None or isinstance(keys, Mapping):
        return keys
    from edgesmith.runtime.signing import load_trusted_keys

    return load_trusted_keys(keys)


def check_signature(
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
    keys = trusted(trusted_keys)
    if sig is None:
        if require_signature:
            raise BundleError(
                f"{where} is not signed, and this device accepts signed bundles only",
                hint="sign it with `edgesmith bundle sign BUNDLE --key NAME.key`",
            )
        if keys:
            log.warning("%s is an unsigned development bundle", where)
        return None, signers
    if not keys:
        if require_signature:
            raise BundleError(
                f"cannot check the signature of {where}: no trusted public key was given",
                hint="pass the publisher's NAME.pub (--key, or the agent's trusted_keys)",
            )
        return None, signers
    from edgesmith.runtime.signing import verify_document

    return verify_document(raw, sig, keys, f"{where}/{SIGNATURE}"), signers


def read_limited(f: IO[bytes], limit: int, where: str) -> bytes:
    data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleError(
            f"{where} is larger than {limit} bytes", hint="this is not an edgesmith bundle"
        )
    return data
