"""Ed25519 signatures for bundle manifests and OTA channel files.

``cryptography`` is imported inside the functions that need it, so a device without it can still
load unsigned bundles where its policy allows. Key files are PEM: the private key as unencrypted
PKCS#8 (written with mode 0600, never logged, never bundled), the public key as SubjectPublicKeyInfo.
A key is named by its *key id*: the SHA-256 (hex) of the raw 32-byte public key.

Two signed formats share one signature record ``{"keyid", "scheme": "ed25519", "sig": base64}``:

* ``manifest.sig`` = ``{"signatures": [record, ...]}``; each record signs exactly the bytes of
  ``manifest.json`` (DESIGN.md section 4).
* a DSSE envelope (``{"payload", "payloadType", "signatures"}``, the format of in-toto and
  Sigstore) for channel files; each record signs ``PAE(payloadType, payload)``, so a channel
  signature can never be replayed as a manifest signature or the other way round.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from edgesmith.errors import BundleError, EdgesmithError

__all__ = [
    "SCHEME",
    "TrustedKeys",
    "dsse_open",
    "dsse_seal",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_trusted_keys",
    "pae",
    "sign_document",
    "verify_document",
]

log = logging.getLogger(__name__)

SCHEME = "ed25519"
MAX_SIGNATURE_BYTES = 64 << 10
TrustedKeys = Mapping[str, bytes]  # key id -> raw 32-byte Ed25519 public key


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise EdgesmithError(
            "checking or making signatures needs the 'cryptography' package",
            hint="pip install 'edgesmith[ota]' (or cryptography>=42)",
        ) from None
    return ed25519


def key_id(public_raw: bytes) -> str:
    """The id of a public key: SHA-256 (hex) of its raw 32 bytes."""
    return hashlib.sha256(public_raw).hexdigest()


def _raw_public(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def generate_keypair(prefix: str | Path, force: bool = False) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair to ``PREFIX.key`` (mode 0600) and ``PREFIX.pub``.

    Returns:
        (private key path, public key path, key id).

    Example:
        >>> generate_keypair("keys/release")     # doctest: +SKIP
    """
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    prefix = Path(prefix)
    priv_path, pub_path = (
        prefix.with_name(prefix.name + ".key"),
        prefix.with_name(prefix.name + ".pub"),
    )
    for p in (priv_path, pub_path):
        if p.exists() and not force:
            raise EdgesmithError(
                f"{p} already exists", hint="pick another name, or pass --force to replace the pair"
            )
    key = ed25519.Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    wrote_private = False
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        _write_private(priv_path, priv_pem)
        wrote_private = True
        tmp = pub_path.with_name(f".{pub_path.name}.tmp")
        tmp.write_bytes(pub_pem)
        os.replace(tmp, pub_path)
    except OSError:  # the CLI reports it (path, reason, hint); exit 2
        if wrote_private:  # never leave a new private key without its public half
            with contextlib.suppress(OSError):
                priv_path.unlink()
        raise
    return priv_path, pub_path, key_id(_raw_public(key.public_key()))


def _write_private(path: Path, data: bytes) -> None:
    """Create the file with mode 0600 from the start (no window where others can read it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_key_file(path: str | Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise EdgesmithError(
            f"{what} file not found: {p}",
            hint="create a key pair with `edgesmith keygen -o NAME` (NAME.key is private, NAME.pub public)",
        )
    try:
        if p.stat().st_size > MAX_SIGNATURE_BYTES:
            raise EdgesmithError(f"{p} is too large to be a key file", hint="give a PEM key file")
        return p.read_bytes()
    except OSError as exc:
        raise EdgesmithError(
            f"cannot read {what} file {p}: {exc.strerror or exc}",
            hint="check the file's permissions",
        ) from None


def load_private_key(path: str | Path) -> Any:
    """Load an Ed25519 private key (PEM, PKCS#8). Warns when others may read the file."""
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    data = _read_key_file(path, "signing key")
    mode = Path(path).stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("signing key %s is readable by others; run: chmod 600 %s", path, path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        hint = (
            "this is a public key; sign with the private NAME.key file"
            if b"PUBLIC KEY" in data
            else "give the NAME.key file written by `edgesmith keygen`"
        )
        raise EdgesmithError(
            f"{path} is not an unencrypted Ed25519 private key ({type(exc).__name__})", hint=hint
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise EdgesmithError(
            f"{path} holds a {type(key).__name__}, not an Ed25519 key",
            hint="create an Ed25519 key pair with `edgesmith keygen`",
        )
    return key


def load_trusted_keys(paths: Iterable[str | Path]) -> dict[str, bytes]:
    """Load public key files (PEM) into ``{key id: raw public key}``.

    A folder stands for every ``*.pub`` file in it.
    """
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.pub")) if p.is_dir() else [p]
    keys: dict[str, bytes] = {}
    for f in files:
        data = _read_key_file(f, "public key")
        try:
            pub = serialization.load_pem_public_key(data)
        except ValueError:
            hint = (
                "this is a PRIVATE key: devices get only the NAME.pub file"
                if b"PRIVATE KEY" in data
                else "give the NAME.pub file written by `edgesmith keygen`"
            )
            raise EdgesmithError(f"{f} is not a PEM public key", hint=hint) from None
        if not isinstance(pub, ed25519.Ed25519PublicKey):
            raise EdgesmithError(
                f"{f} holds a {type(pub).__name__}, not an Ed25519 public key",
                hint="create an Ed25519 key pair with `edgesmith keygen`",
            )
        raw = _raw_public(pub)
        keys[key_id(raw)] = raw
    return keys


def _record(data: bytes, key: Any) -> dict[str, str]:
    raw = _raw_public(key.public_key())
    return {
        "keyid": key_id(raw),
        "scheme": SCHEME,
        "sig": base64.b64encode(key.sign(data)).decode("ascii"),
    }


def _check_records(
    data: bytes, records: Any, trusted: TrustedKeys, what: str, error: type[EdgesmithError]
) -> str:
    ed25519 = _crypto()
    from cryptography.exceptions import InvalidSignature

    if not isinstance(records, list) or not records:
        raise error(f"{what} holds no signatures", hint="sign it again")
    seen = []
    for rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("keyid"), str):
            raise error(f"{what} has a malformed signature record", hint="sign it again")
        seen.append(rec["keyid"][:16])
        if rec.get("scheme", SCHEME) != SCHEME or rec["keyid"] not in trusted:
            continue
        try:
            sig = base64.b64decode(str(rec.get("sig", "")), validate=True)
            ed25519.Ed25519PublicKey.from_public_bytes(trusted[rec["keyid"]]).verify(sig, data)
        except (InvalidSignature, binascii.Error, ValueError):
            raise error(
                f"{what}: the signature by key {rec['keyid'][:16]} does not match the signed bytes",
                hint="the file was altered after signing; do not use it",
            ) from None
        return str(rec["keyid"])
    raise error(
        f"{what} is signed by key(s) {', '.join(seen)}, none of which is trusted here",
        hint="install the publisher's NAME.pub as a trusted key, or re-sign with a trusted key",
    )


def sign_document(data: bytes, key: Any, existing: bytes | None = None) -> bytes:
    """The ``manifest.sig`` bytes for ``data``: a signature record by ``key`` added to ``existing``.

    A record by the same key id is replaced; records by other keys are kept (key rotation).
    """
    records: list[dict[str, Any]] = []
    if existing:
        with contextlib.suppress(ValueError, AttributeError):
            records = list(json.loads(existing).get("signatures", []))
    rec = _record(data, key)
    records = [r for r in records if isinstance(r, dict) and r.get("keyid") != rec["keyid"]]
    records.append(rec)
    return (json.dumps({"signatures": records}, indent=2, sort_keys=True) + "\n").encode()


def verify_document(data: bytes, document: bytes, trusted: TrustedKeys, what: str) -> str:
    """Check a ``manifest.sig`` document against ``data``; return the key id that verified.

    Raises:
        BundleError: malformed document, a bad signature, or no signature by a trusted key.
    """
    if len(document) > MAX_SIGNATURE_BYTES:
        raise BundleError(f"{what} is too large", hint="this is not an edgesmith signature file")
    try:
        records = json.loads(document)["signatures"]
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"{what} is not a signature file", hint="sign the bundle again") from None
    return _check_records(data, records, trusted, what, BundleError)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what an envelope signature covers."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def dsse_seal(payload: bytes, payload_type: str, key: Any) -> bytes:
    """A signed DSSE envelope (canonical JSON bytes) around ``payload``."""
    env = {
        "payload": base64.b64encode(payload).decode("ascii"),
        "payloadType": payload_type,
        "signatures": [_record(pae(payload_type, payload), key)],
    }
    return (json.dumps(env, indent=2, sort_keys=True) + "\n").encode()


def dsse_open(
    envelope: bytes,
    payload_type: str,
    trusted: TrustedKeys,
    what: str,
    error: type[EdgesmithError] = EdgesmithError,
) -> tuple[bytes, str]:
    """Verify a DSSE envelope and return (payload bytes, key id). The payload is not parsed here.

    Raises:
        error: malformed envelope, wrong payload type, bad or untrusted signature.
    """
    try:
        env = json.loads(envelope)
        payload = base64.b64decode(env["payload"], validate=True)
        ptype = env["payloadType"]
        records = env["signatures"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise error(
            f"{what} is not a signed envelope (corrupt or truncated)",
            hint="publish it again with `edgesmith ota publish`",
        ) from None
    if ptype != payload_type:
        raise error(
            f"{what} holds '{ptype}', expected '{payload_type}'",
            hint="point the agent at a channel file written by `edgesmith ota publish`",
        )
    return payload, _check_records(pae(payload_type, payload), records, trusted, what, error)
