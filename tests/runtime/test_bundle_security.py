"""Bundles and model files as an attacker writes them (issue 12, rows 4, 8, 9, 10 and item 3):
every file a bundle uses is listed and hashed, tar extraction takes plain files only within
limits, manifest paths go through one accessor, signatures can be required by ``runtime.load``,
and user errors exit 2 with one line (never 70)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from _tiny import expected, manifest, tiny_bundle, tiny_onnx

from edgesmith.cli import main
from edgesmith.errors import BundleError, ModelLoadError
from edgesmith.runtime import load, read_bundle
from edgesmith.runtime.bundle import (
    MANIFEST,
    TarLimits,
    canonical_bytes,
    extract_bundle,
    member_path,
    pack_bundle,
    verify_bundle,
    write_bundle,
)
from edgesmith.runtime.golden import read_golden
from edgesmith.runtime.onnxfile import scan_onnx
from edgesmith.runtime.signing import generate_keypair

X = np.linspace(0, 1, 3 * 64, dtype=np.float32).reshape(3, 1, 8, 8)


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "internal error" not in out.err, out.err
    return int(exc.value.code or 0), out.out, out.err


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    key, pub, _ = generate_keypair(d / "release")
    wrong_key, wrong_pub, _ = generate_keypair(d / "wrong")
    return {"key": key, "pub": pub, "wrong_key": wrong_key, "wrong_pub": wrong_pub}


def _hand_written_bundle(out: Path, contents: dict[str, bytes], **fields: object) -> Path:
    """A bundle folder written without write_bundle's checks: what an attacker can put on disk.
    ``listed`` names the files the manifest lists (default: all); other fields override."""
    out.mkdir(parents=True)
    for rel, data in contents.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    listed = fields.pop("listed", list(contents))
    doc = {
        "schema": "edgesmith.bundle/1",
        "created": "2026-01-01T00:00:00Z",
        **manifest(),
        "files": {
            rel: {"sha256": hashlib.sha256(contents[rel]).hexdigest(), "size": len(contents[rel])}
            for rel in listed  # type: ignore[attr-defined]
        },
        **fields,
    }
    (out / MANIFEST).write_bytes(canonical_bytes(doc))
    return out


# --------------------------------------------------------------------------- row 4


def test_load_refuses_external_data_the_manifest_does_not_list(tmp_path: Path) -> None:
    work = tmp_path / "work"
    tiny_onnx(work / "model.onnx", "w.bin")
    bundle = _hand_written_bundle(
        tmp_path / "b",
        {"model.onnx": (work / "model.onnx").read_bytes(), "w.bin": (work / "w.bin").read_bytes()},
        listed=["model.onnx"],
    )
    # before: the unlisted (unhashed, unsigned) weights were loaded, so changing them changed
    # the outputs of a "verified" bundle
    with pytest.raises(BundleError, match="'w.bin' that the manifest does not list") as info:
        load(bundle)
    assert "bundle create" in (info.value.hint or "")
    with pytest.raises(BundleError, match="does not list"):
        verify_bundle(bundle)


def test_write_bundle_never_leaves_a_models_external_data_out(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "work" / "model.onnx", "data/w.bin")
    with pytest.raises(BundleError, match="'data/w.bin' that the manifest does not list"):
        write_bundle(tmp_path / "b", manifest(), {"model.onnx": model})
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_bundle_create_includes_external_data_and_signs_a_bundle_that_loads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, keys: dict[str, Path]
) -> None:
    # a location that the old name-based guess (.bin / .data next to the model) missed
    model = tiny_onnx(tmp_path / "src" / "net.onnx", "weights/tensor.raw")
    (tmp_path / "src" / "unrelated.data").write_bytes(b"not used by the model")
    out = tmp_path / "net.bundle"
    code, _, err = run(
        capsys, "bundle", "create", model, "-o", out, "--name", "net", "--version", "3",
        "--target", "x86-cpu", "--sign-key", keys["key"],
    )  # fmt: skip
    assert code == 0, err
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert sorted(files) == ["net.onnx", "weights/tensor.raw"]
    m = load(out, trusted_keys=[keys["pub"]], require_signature=True)
    np.testing.assert_allclose(m(X), expected(X), atol=1e-5)
    tar = tmp_path / "net.tar"
    code, _, err = run(
        capsys, "bundle", "create", model, "-o", tar, "--name", "net", "--version", "3",
        "--target", "x86-cpu",
    )  # fmt: skip
    assert code == 0, err
    extract_bundle(tar, tmp_path / "x")
    np.testing.assert_allclose(load(tmp_path / "x")(X), expected(X), atol=1e-5)


def test_nul_byte_in_an_external_data_location_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = tiny_onnx(tmp_path / "m.onnx", "w\x00.bin", raw_location=True)
    with pytest.raises(ModelLoadError, match=r"control characters: 'w\\x00.bin'"):
        scan_onnx(model)
    np.save(tmp_path / "x.npy", X)
    code, _, err = run(capsys, "run", model, tmp_path / "x.npy")
    assert code == 2 and "error: m.onnx names an external data file" in err
    code, _, err = run(
        capsys, "bundle", "create", model, "-o", tmp_path / "b", "--name", "m", "--version", "1",
        "--target", "x86-cpu",
    )  # fmt: skip
    assert code == 2 and "control characters" in err


# --------------------------------------------------------------------------- row 8


def _sparse_member(name: str, realsize: int) -> tuple[tarfile.TarInfo, bytes]:
    """A GNU sparse 1.0 member (PAX headers) that expands to ``realsize`` bytes of zeros."""
    smap = f"1\n{realsize}\n0\n".encode()
    payload = smap + b"\0" * (-len(smap) % 512)
    info = tarfile.TarInfo("GNUSparseFile.0/" + name)
    info.size = len(payload)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(realsize),
    }
    return info, payload


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.size else None)
    return path


def _file(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), kind
    return info, data


def _listing_bundle(tmp_path: Path, files: dict[str, bytes]) -> bytes:
    """The manifest bytes of a bundle that lists ``files`` (as the hostile tar will carry)."""
    return (
        _hand_written_bundle(tmp_path / "listing", files, model=next(iter(files))) / MANIFEST
    ).read_bytes()


def test_sparse_members_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real = 8 << 20  # 8 MiB of zeros from a tar of a few KiB
    raw = _listing_bundle(tmp_path, {"model.onnx": b"\0" * real})
    tar = _tar(tmp_path / "sparse.tar", [_file(MANIFEST, raw), _sparse_member("model.onnx", real)])
    assert tar.stat().st_size < 16 << 10
    with pytest.raises(BundleError, match="member 'model.onnx' is a sparse file"):
        extract_bundle(tar, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    code, _, err = run(capsys, "bundle", "verify", tar)
    assert code == 1 and "sparse file" in err
    code, _, err = run(capsys, "bundle", "unpack", tar, "-o", tmp_path / "out2")
    assert code == 2 and "sparse file" in err and not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    ("kind", "what"), [(tarfile.CONTTYPE, "contiguous file"), (tarfile.BLKTYPE, "special file")]
)
def test_exotic_member_types_are_refused(tmp_path: Path, kind: bytes, what: str) -> None:
    raw = _listing_bundle(tmp_path, {"model.onnx": b"abc"})
    tar = _tar(tmp_path / "t.tar", [_file(MANIFEST, raw), _file("model.onnx", b"abc", kind)])
    with pytest.raises(BundleError, match=f"is a {what}"):
        extract_bundle(tar, tmp_path / "out")


def test_total_size_and_member_count_are_capped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tiny_bundle(tmp_path / "b", tmp_path / "w")
    tar = pack_bundle(bundle, tmp_path / "b.tar")
    with tarfile.open(tar) as tf:
        size = sum(m.size for m in tf if m.isreg())  # the manifest counts too
    with pytest.raises(BundleError, match=f"more than {size - 1} bytes"):
        extract_bundle(tar, tmp_path / "o1", limits=TarLimits(max_total_bytes=size - 1))
    with pytest.raises(BundleError, match="more than 2 members"):
        verify_bundle(tar, limits=TarLimits(max_members=2))
    extract_bundle(tar, tmp_path / "o2", limits=TarLimits(max_total_bytes=size))
    monkeypatch.setenv("EDGESMITH_BUNDLE_MAX_BYTES", str(size - 1))
    code, _, err = run(capsys, "bundle", "unpack", tar, "-o", tmp_path / "o3")
    assert code == 2 and "EDGESMITH_BUNDLE_MAX_BYTES" in err and not (tmp_path / "o3").exists()


def test_a_path_that_is_both_file_and_folder_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = {"model.onnx": b"m", "x": b"file", "x/y": b"below the file"}
    raw = (
        _hand_written_bundle(tmp_path / "l", {"model.onnx": b"m", "x": b"file"}, files={
            rel: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
            for rel, d in files.items()
        }, model="model.onnx") / MANIFEST
    ).read_bytes()  # fmt: skip
    tar = _tar(tmp_path / "t.tar", [_file(MANIFEST, raw), *(_file(r, d) for r, d in files.items())])
    code, _, err = run(capsys, "bundle", "unpack", tar, "-o", tmp_path / "out")
    assert code == 2 and "'x' is both a file and a folder" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(BundleError, match="both a file and a folder"):
        write_bundle(
            tmp_path / "w",
            manifest(),
            {"model.onnx": tmp_path / "t.tar", "model.onnx/a": tmp_path / "t.tar"},
        )


# --------------------------------------------------------------------------- row 9


@pytest.mark.parametrize("golden", ["golden.npz", "../golden.npz", "/etc/passwd", "sub/../g.npz"])
def test_golden_file_must_be_listed(tmp_path: Path, golden: str) -> None:
    work = tmp_path / "w"
    model = tiny_onnx(work / "model.onnx").read_bytes()
    np.savez(tmp_path / "golden.npz", inputs=X, outputs=expected(X))
    bundle = _hand_written_bundle(
        tmp_path / "b",
        {"model.onnx": model, "golden.npz": (tmp_path / "golden.npz").read_bytes()},
        listed=["model.onnx"],
        golden={"file": golden, "atol": 1e-4},
    )
    with pytest.raises(BundleError, match="names golden file .* does not list it"):
        read_bundle(bundle)


def test_golden_data_goes_through_the_verified_accessor(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "b", tmp_path / "w")
    m = read_bundle(bundle)
    data = read_golden(bundle, m)
    assert data is not None and data[0].shape == (2, 1, 8, 8)
    np.testing.assert_allclose(data[1], expected(data[0]), atol=1e-6)
    with pytest.raises(BundleError, match="does not list it"):
        member_path(bundle, m, "manifest.json", "golden file")
    (bundle / "golden.npz").unlink()
    (bundle / "golden.npz").symlink_to(bundle / "model.onnx")
    with pytest.raises(BundleError, match="symbolic link"):
        read_golden(bundle, m)


def test_health_check_reads_golden_data_through_the_accessor(tmp_path: Path) -> None:
    from edgesmith.devices.ota.health import check_health

    bundle = tiny_bundle(tmp_path / "b", tmp_path / "w")
    report = check_health(bundle)
    assert report.ok and report.golden, report
    shutil.copyfile(bundle / "model.onnx", tmp_path / "m.onnx")
    (bundle / "golden.npz").unlink()
    (bundle / "golden.npz").symlink_to(tmp_path / "m.onnx")
    report = check_health(bundle)
    assert not report.ok and "symbolic link" in report.reason


# --------------------------------------------------------------------------- item 3: signatures


def test_load_can_require_a_trusted_signature(tmp_path: Path, keys: dict[str, Path]) -> None:
    unsigned = tiny_bundle(tmp_path / "u", tmp_path / "w1")
    signed = tiny_bundle(tmp_path / "s", tmp_path / "w2", sign_key=keys["key"])
    wrong = tiny_bundle(tmp_path / "x", tmp_path / "w3", sign_key=keys["wrong_key"])
    policy = {"trusted_keys": [keys["pub"]], "require_signature": True}
    m = load(signed, **policy)
    np.testing.assert_allclose(m(X), expected(X), atol=1e-5)
    with pytest.raises(BundleError, match="is not signed"):
        load(unsigned, **policy)
    with pytest.raises(BundleError, match="none of which is trusted"):
        load(wrong, **policy)
    with pytest.raises(BundleError, match="none of which is trusted"):
        load(wrong, trusted_keys=[keys["pub"]])  # a present signature must verify
    with pytest.raises(BundleError, match="bare model file"):
        load(unsigned / "model.onnx", **policy)
    with pytest.raises(BundleError, match="needs the trusted public keys"):
        load(signed, require_signature=True)
    # a file changed after signing fails its hash even though the signature is fine
    (signed / "golden.npz").write_bytes(b"changed")
    with pytest.raises(BundleError, match="golden.npz"):
        load(signed, **policy)


# --------------------------------------------------------------------------- row 10


def test_keygen_and_bundle_create_os_errors_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Row 10: OSErrors of these commands are one-line errors with a hint (the generic mapping of
    OSErrors in edgesmith/cli.py), and nothing half-written is left."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run(capsys, "keygen", "-o", blocker / "keys" / "release")
    assert code == 2 and str(blocker) in err and "hint: " in err
    assert not list(tmp_path.rglob("*.key")) and not list(tmp_path.rglob("*.pub"))
    model = tiny_onnx(tmp_path / "m.onnx")
    for out in (blocker / "out", blocker / "out.tar"):
        code, _, err = run(
            capsys, "bundle", "create", model, "-o", out, "--name", "m", "--version", "1",
            "--target", "x86-cpu",
        )  # fmt: skip
        assert code == 2 and str(blocker) in err and "hint: " in err
    tar = pack_bundle(tiny_bundle(tmp_path / "b", tmp_path / "w"), tmp_path / "b.tar")
    code, _, err = run(capsys, "bundle", "unpack", tar, "-o", blocker / "x")
    assert code == 2 and str(blocker) in err and "hint: " in err


def test_manifest_strings_are_escaped_on_the_terminal(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    evil = "\x1b]0;pwned\x07\x1b[2J"
    model = tiny_onnx(tmp_path / "w" / "model.onnx").read_bytes()
    bundle = _hand_written_bundle(
        tmp_path / "b",
        {"model.onnx": model},
        target=f"x86-cpu{evil}",
        precision=evil,
        labels=[evil, "b", "c"],
        inputs=[{"name": evil, "shape": ["batch", 1, 8, 8], "dtype": "float32"}],
    )
    code, out, err = run(capsys, "bundle", "inspect", bundle)
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\\x1b]0;pwned\\x07" in out
    np.save(tmp_path / "x.npy", np.full((1, 1, 8, 8), 10, np.float32))
    code, out, err = run(capsys, "run", bundle, tmp_path / "x.npy", "-k", "3")
    assert code == 0, err
    assert "\x1b" not in out + err and "\\x1b" in out


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("inputs", [{"shape": [1]}], "'inputs': .*name"),
        ("golden", {"file": ["golden.npz"]}, "'golden'"),
        ("preprocess", {"resize": [0, 10**9]}, "'preprocess'"),
        ("preprocess", {"channels": "GRAY", "mean": [0.1, 0.2, 0.3]}, "'preprocess'"),
        ("files", {"model.onnx\x00": {"sha256": "0" * 64, "size": 1}}, "non-printable"),
    ],
)
def test_malformed_manifest_fields_are_bundle_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: object, message: str
) -> None:
    model = tiny_onnx(tmp_path / "w" / "model.onnx").read_bytes()
    bundle = _hand_written_bundle(tmp_path / "b", {"model.onnx": model}, **{field: value})
    with pytest.raises(BundleError, match=message):
        read_bundle(bundle)
    code, _, err = run(capsys, "bundle", "inspect", bundle)
    assert code == 2 and err.startswith("error: ")


def test_keygen_into_an_existing_folder_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``keygen -o keys/`` used to write ``keys.key`` beside the folder; it names the fix now."""
    folder = tmp_path / "keys"
    folder.mkdir()
    code, _, err = run(capsys, "keygen", "-o", folder)
    assert code == 2 and "is a folder" in err and f"-o {folder / 'release'}" in err, err
    assert list(tmp_path.iterdir()) == [folder] and not any(folder.iterdir())
    code, _, err = run(capsys, "keygen", "-o", folder / "release")
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["release.key", "release.pub"]
