"""The bundle format (DESIGN.md section 4): golden bytes, signatures over the exact manifest
bytes, tamper evidence, and safe tar extraction."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from golden_inputs import golden_channel, golden_files, golden_key, golden_manifest
from ota_helpers import Bundles

from edgesmith.errors import BundleError
from edgesmith.runtime.bundle import (
    MANIFEST,
    SIGNATURE,
    extract_bundle,
    pack_bundle,
    read_bundle,
    sign_bundle,
    verify_bundle,
    write_bundle,
)
from edgesmith.runtime.signing import key_id, load_trusted_keys

GOLDEN = Path(__file__).parent / "golden"


def _raw_pub(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)  # type: ignore[attr-defined]


@pytest.fixture
def golden_bundle(tmp_path: Path) -> Path:
    out = tmp_path / "golden-bundle"
    write_bundle(out, golden_manifest(), golden_files(tmp_path), sign_key=golden_key())
    return out


@pytest.fixture
def trusted() -> dict[str, bytes]:
    raw = _raw_pub(golden_key())
    return {key_id(raw): raw}


def test_manifest_bytes_are_golden(golden_bundle: Path, tmp_path: Path) -> None:
    assert (golden_bundle / MANIFEST).read_bytes() == (GOLDEN / MANIFEST).read_bytes()
    # the hashes in it are plain SHA-256 of the files (checked independently of the writer)
    files = json.loads((GOLDEN / MANIFEST).read_bytes())["files"]
    for rel, src in golden_files(tmp_path).items():
        assert files[rel] == {
            "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
            "size": src.stat().st_size,
        }


def test_signature_bytes_are_golden_and_cover_the_manifest_bytes(golden_bundle: Path) -> None:
    assert (golden_bundle / SIGNATURE).read_bytes() == (GOLDEN / SIGNATURE).read_bytes()
    rec = json.loads((GOLDEN / SIGNATURE).read_bytes())["signatures"][0]
    pub = golden_key().public_key()
    assert rec["keyid"] == hashlib.sha256(_raw_pub(golden_key())).hexdigest()
    assert rec["scheme"] == "ed25519"
    pub.verify(base64.b64decode(rec["sig"]), (GOLDEN / MANIFEST).read_bytes())  # raises if not


def test_channel_envelope_bytes_are_golden(trusted: dict[str, bytes]) -> None:
    from edgesmith.devices.ota.channel import PAYLOAD_TYPE, open_channel, seal_channel
    from edgesmith.runtime.signing import pae

    sealed = seal_channel(golden_channel(), golden_key())
    assert sealed == (GOLDEN / "channel.json").read_bytes()
    env = json.loads(sealed)
    payload = base64.b64decode(env["payload"])
    # DSSE: the signature covers PAE(type, payload), never the bare payload
    golden_key().public_key().verify(
        base64.b64decode(env["signatures"][0]["sig"]), pae(PAYLOAD_TYPE, payload)
    )
    assert pae("t", b"xy") == b"DSSEv1 1 t 2 xy"
    ch = open_channel(
        sealed,
        trusted,
        "golden",
        now=__import__("datetime").datetime(
            2026, 1, 10, tzinfo=__import__("datetime").timezone.utc
        ),
    )
    assert ch.releases[0].rollout == 20.0


def test_signed_bundle_verifies_with_its_key_only(
    golden_bundle: Path, trusted: dict[str, bytes], keys: dict[str, Path]
) -> None:
    check = verify_bundle(golden_bundle, trusted_keys=trusted, require_signature=True)
    assert check.signed_by == next(iter(trusted))
    with pytest.raises(BundleError, match="none of which is trusted"):
        verify_bundle(golden_bundle, trusted_keys=[keys["pub"]])


def test_same_json_with_other_bytes_breaks_the_signature(
    golden_bundle: Path, trusted: dict[str, bytes]
) -> None:
    doc = json.loads((golden_bundle / MANIFEST).read_bytes())
    (golden_bundle / MANIFEST).write_text(json.dumps(doc, sort_keys=True))  # same content, compact
    with pytest.raises(BundleError, match="does not match the signed bytes"):
        verify_bundle(golden_bundle, trusted_keys=trusted)


def test_signature_is_checked_before_the_manifest_is_parsed(
    golden_bundle: Path, trusted: dict[str, bytes]
) -> None:
    (golden_bundle / MANIFEST).write_bytes(b'{"schema": "not json at all')
    with pytest.raises(BundleError) as exc:
        verify_bundle(golden_bundle, trusted_keys=trusted)
    assert "signature" in exc.value.message and "JSON" not in exc.value.message


def test_changed_version_in_a_signed_manifest_is_detected(
    golden_bundle: Path, trusted: dict[str, bytes]
) -> None:
    raw = (golden_bundle / MANIFEST).read_bytes().replace(b'"version": 7', b'"version": 8')
    (golden_bundle / MANIFEST).write_bytes(raw)
    with pytest.raises(BundleError, match="does not match the signed bytes"):
        read_bundle(golden_bundle, trusted_keys=trusted)


def test_flipped_byte_in_a_file_fails_its_hash(
    golden_bundle: Path, trusted: dict[str, bytes]
) -> None:
    f = golden_bundle / "model.onnx"
    data = bytearray(f.read_bytes())
    data[3] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"'model\.onnx' does not match its SHA-256"):
        read_bundle(golden_bundle, trusted_keys=trusted)
    # still readable without re-hashing (what `bundle inspect` does)
    assert read_bundle(golden_bundle, verify=False).version == 7


def test_signature_policy(
    golden_bundle: Path, trusted: dict[str, bytes], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unsigned = tmp_path / "unsigned"
    write_bundle(unsigned, golden_manifest(), golden_files(tmp_path))
    # no keys, no policy: backward compatible, nothing checked (runtime.load's default)
    assert read_bundle(unsigned).version == 7 and read_bundle(golden_bundle).version == 7
    with pytest.raises(
        BundleError, match="not signed, and this device accepts signed bundles only"
    ):
        read_bundle(unsigned, trusted_keys=trusted, require_signature=True)
    with pytest.raises(BundleError, match="no trusted public key was given"):
        read_bundle(golden_bundle, require_signature=True)
    with caplog.at_level(logging.WARNING):
        assert read_bundle(unsigned, trusted_keys=trusted).version == 7
    assert "unsigned development bundle" in caplog.text


def test_key_rotation_keeps_both_signatures(
    golden_bundle: Path, trusted: dict[str, bytes], keys: dict[str, Path]
) -> None:
    sign_bundle(golden_bundle, keys["key"])
    new = load_trusted_keys([keys["pub"]])
    assert verify_bundle(golden_bundle, trusted_keys=new).signed_by == next(iter(new))
    assert verify_bundle(golden_bundle, trusted_keys=trusted).signed_by == next(iter(trusted))
    assert len(json.loads((golden_bundle / SIGNATURE).read_bytes())["signatures"]) == 2


def test_signing_refuses_a_tampered_bundle(golden_bundle: Path, keys: dict[str, Path]) -> None:
    (golden_bundle / "golden.npz").write_bytes(b"changed")
    before = (golden_bundle / SIGNATURE).read_bytes()
    with pytest.raises(BundleError, match="has 7 bytes"):
        sign_bundle(golden_bundle, keys["key"])
    assert (golden_bundle / SIGNATURE).read_bytes() == before


def test_tar_round_trip_is_reproducible(
    golden_bundle: Path, trusted: dict[str, bytes], tmp_path: Path
) -> None:
    a, b = (
        pack_bundle(golden_bundle, tmp_path / "a.tar"),
        pack_bundle(golden_bundle, tmp_path / "b.tar"),
    )
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tf:
        assert tf.getnames() == [MANIFEST, SIGNATURE, "golden.npz", "model.onnx"]
    assert verify_bundle(a, trusted_keys=trusted, require_signature=True).manifest.version == 7
    m = extract_bundle(a, tmp_path / "x", trusted_keys=trusted, require_signature=True, fsync=True)
    assert m.version == 7
    for name in (MANIFEST, SIGNATURE, "golden.npz", "model.onnx"):
        assert (tmp_path / "x" / name).read_bytes() == (golden_bundle / name).read_bytes()


def test_signing_a_tar_bundle_in_place(
    golden_bundle: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    tar = pack_bundle(golden_bundle, tmp_path / "b.tar")
    sign_bundle(tar, keys["key"])
    assert (
        verify_bundle(tar, trusted_keys=[keys["pub"]], require_signature=True).signed_by is not None
    )


def _evil_tar(golden_bundle: Path, path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w") as tf:
        for name in (MANIFEST, SIGNATURE, "golden.npz", "model.onnx"):
            tf.add(golden_bundle / name, arcname=name)
        tf.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return path


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 0
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, size
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_member("/etc/cron.d/evil", size=3), "unsafe path '/etc/cron.d/evil'"),
        (_member("../evil", size=3), "unsafe path '../evil'"),
        (_member("sub/../../evil", size=3), "unsafe path"),
        (_member("model.link", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
        (_member("model.hard", tarfile.LNKTYPE, "model.onnx"), "is a link"),
        (_member("dev", tarfile.CHRTYPE), "is a special file"),
        (_member("fifo", tarfile.FIFOTYPE), "is a special file"),
        (_member("extra.sh", size=3), "files the manifest does not list: extra.sh"),
        (_member("model.onnx", size=3), "appears twice"),
    ],
)
def test_unsafe_tar_members_are_refused(
    golden_bundle: Path, tmp_path: Path, member: tarfile.TarInfo, message: str
) -> None:
    tar = _evil_tar(golden_bundle, tmp_path / "evil.tar", member, b"abc")
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace(".", r"\.")):
        extract_bundle(tar, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert not Path("/etc/cron.d/evil").exists() and not (tmp_path / "evil").exists()


def test_truncated_tar_is_refused(golden_bundle: Path, tmp_path: Path) -> None:
    tar = pack_bundle(golden_bundle, tmp_path / "b.tar")
    tar.write_bytes(tar.read_bytes()[:2000])
    with pytest.raises(BundleError):
        extract_bundle(tar, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_symlinked_file_in_a_folder_bundle_is_refused(golden_bundle: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes((golden_bundle / "golden.npz").read_bytes())
    (golden_bundle / "golden.npz").unlink()
    (golden_bundle / "golden.npz").symlink_to(secret)
    with pytest.raises(BundleError, match="is a symbolic link"):
        read_bundle(golden_bundle)


def test_expiry_field_is_validated(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="expires"):
        write_bundle(
            tmp_path / "b", {**golden_manifest(), "expires": "next tuesday"}, golden_files(tmp_path)
        )
    m = write_bundle(
        tmp_path / "c",
        {**golden_manifest(), "expires": "2020-01-01T00:00:00Z"},
        golden_files(tmp_path),
    )
    assert m.expired() and not write_bundle(
        tmp_path / "d", golden_manifest(), golden_files(tmp_path)
    ).expired(
        now=__import__("datetime").datetime(2026, 6, 1, tzinfo=__import__("datetime").timezone.utc)
    )


def test_runtime_load_accepts_signed_bundles_unchanged(bundles: Bundles) -> None:
    from edgesmith.runtime import load

    model = load(bundles.make(2))
    assert model.manifest is not None and model.manifest.version == 2


def test_unsigned_bundles_load_without_cryptography(
    bundles: Bundles, keys: dict[str, Path]
) -> None:
    """A device without `cryptography` still loads unsigned (or unchecked) bundles."""
    code = f"""
import sys
sys.modules["cryptography"] = None  # as if it were not installed
from edgesmith.runtime import load, read_bundle
from edgesmith.errors import EdgesmithError
assert load({str(bundles.make(2, key=None))!r}).manifest.version == 2
assert read_bundle({str(bundles.make(2))!r}).version == 2
try:
    read_bundle({str(bundles.make(2))!r}, trusted_keys={{"k": b"0" * 32}}, require_signature=True)
except EdgesmithError as exc:
    print("ERR", exc.message, "|", exc.hint)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ERR checking or making signatures needs the 'cryptography' package" in r.stdout
    assert "edgesmith[ota]" in r.stdout
