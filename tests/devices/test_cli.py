"""`edgesmith keygen`, `bundle ...` and `ota ...` through the real entry point (exit codes, one-line
errors with hints, no tracebacks)."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from ota_helpers import Bundles, installed_manifest

from edgesmith.cli import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return int(exc.value.code or 0), out.out, out.err


def test_keygen_writes_a_private_key_only_its_owner_can_read(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "keygen", "-o", tmp_path / "k" / "release")
    assert code == 0
    priv, pub = tmp_path / "k" / "release.key", tmp_path / "k" / "release.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    assert "PRIVATE" not in out and priv.read_text().splitlines()[1] not in out, (
        "the key is never printed"
    )
    code, _, err = run(capsys, "keygen", "-o", tmp_path / "k" / "release")
    assert code == 2 and "already exists" in err and "--force" in err


def test_bundle_create_inspect_verify_sign(
    capsys: pytest.CaptureFixture[str], bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    ref = bundles.ref
    onnx = tmp_path / "net.onnx"
    shutil.copyfile(ref / bundles.manifest.model, onnx)
    with np.load(ref / "golden.npz") as g:
        np.savez(tmp_path / "inputs.npz", inputs=g["inputs"])  # outputs are computed by create
        expected = g["outputs"]
    (tmp_path / "labels.txt").write_text("\n".join(bundles.manifest.labels or []))
    out = tmp_path / "net.tar"
    code, text, _ = run(
        capsys,
        "bundle",
        "create",
        onnx,
        "-o",
        out,
        "--name",
        "net",
        "--version",
        "5",
        "--target",
        "x86-cpu",
        "--golden",
        tmp_path / "inputs.npz",
        "--labels",
        tmp_path / "labels.txt",
        "--sign-key",
        keys["key"],
    )
    assert code == 0 and "(signed)" in text
    code, text, err = run(
        capsys,
        "bundle",
        "verify",
        out,
        "--key",
        keys["pub"],
        "--require-signature",
        "--target",
        "intel-npu",
    )
    assert (
        code == 0 and "ok: net version 5: 2 file(s) verified, signed by key" in text and err == ""
    )
    code, text, _ = run(capsys, "bundle", "inspect", out, "--key", keys["pub"], "--json")
    doc = json.loads(text)
    assert doc["manifest"]["golden"]["file"] == "golden.npz" and doc["signed_by"]
    assert doc["manifest"]["labels"][0] == "T-shirt/top"
    unpacked = tmp_path / "net"
    assert (
        run(
            capsys,
            "bundle",
            "unpack",
            out,
            "-o",
            unpacked,
            "--key",
            keys["pub"],
            "--require-signature",
        )[0]
        == 0
    )
    with np.load(unpacked / "golden.npz") as g:
        np.testing.assert_allclose(g["outputs"], expected, atol=1e-5)
    from edgesmith.devices.ota import check_health

    assert check_health(unpacked).ok
    # the bundle targets x86: a Raspberry Pi must not take it
    code, _, err = run(capsys, "bundle", "verify", out, "--key", keys["pub"], "--target", "rpi5")
    assert code == 1 and "does not run on 'rpi5'" in err


def test_bundle_verify_outcomes(
    capsys: pytest.CaptureFixture[str], bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    unsigned = bundles.make(2, key=None)
    code, text, err = run(capsys, "bundle", "verify", unsigned)
    assert code == 0 and "verified" in text and "warning: unsigned development bundle" in err
    code, _, err = run(
        capsys, "bundle", "verify", unsigned, "--key", keys["pub"], "--require-signature"
    )
    assert code == 1 and "accepts signed bundles only" in err
    signed = bundles.make(2)
    code, _, err = run(capsys, "bundle", "verify", signed)
    assert code == 2 and "no trusted public key was given" in err and "--key NAME.pub" in err
    code, _, err = run(capsys, "bundle", "verify", signed, "--key", keys["wrong_pub"])
    assert code == 1 and "none of which is trusted" in err
    bad = tmp_path / "bad"
    shutil.copytree(signed, bad)
    (bad / "golden.npz").write_bytes(b"x")
    code, _, err = run(capsys, "bundle", "verify", bad, "--key", keys["pub"])
    assert code == 1 and "'golden.npz' has 1 bytes" in err
    code, _, err = run(capsys, "bundle", "verify", tmp_path / "nothing")
    assert code == 2 and "is not a bundle" in err


def test_bad_key_files_are_clear_errors(
    capsys: pytest.CaptureFixture[str], bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    b = tmp_path / "b"
    shutil.copytree(bundles.make(2, key=None), b)
    code, _, err = run(capsys, "bundle", "sign", b, "--key", tmp_path / "missing.key")
    assert code == 2
    assert err.splitlines() == [
        f"error: signing key file not found: {tmp_path / 'missing.key'}",
        "hint: create a key pair with `edgesmith keygen -o NAME` (NAME.key is private, NAME.pub public)",
    ]
    code, _, err = run(capsys, "bundle", "sign", b, "--key", keys["pub"])
    assert code == 2 and "this is a public key" in err
    code, _, err = run(capsys, "bundle", "verify", b, "--key", keys["key"])
    assert code == 2 and "this is a PRIVATE key" in err
    assert not (b / "manifest.sig").exists()


def test_ota_publish_install_status(
    capsys: pytest.CaptureFixture[str], bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    store, root = tmp_path / "store", tmp_path / "dev"
    code, text, _ = run(
        capsys,
        "ota",
        "publish",
        bundles.make(1, key=None),
        "--store",
        store,
        "--key",
        keys["key"],
        "--rollout",
        "20%",
        "--expires",
        "7d",
    )
    assert code == 0 and "at 20% " in text
    code, text, _ = run(capsys, "ota", "channel", "--store", store, "--key", keys["pub"])
    ch = json.loads(text)
    assert code == 0 and ch["releases"][0]["rollout"] == 20.0 and ch["releases"][0]["version"] == 1
    # the store copy was signed on the way in; the source stayed unsigned
    tar = store / ch["releases"][0]["path"]
    assert run(capsys, "bundle", "verify", tar, "--key", keys["pub"], "--require-signature")[0] == 0
    assert not (bundles.make(1, key=None) / "manifest.sig").exists()
    code, text, _ = run(
        capsys, "ota", "install", tar, "--root", root, "--key", keys["pub"], "--target", "x86-cpu"
    )
    assert code == 0 and json.loads(text)["status"] == "installed"
    assert installed_manifest(root).version == 1
    code, text, _ = run(capsys, "ota", "status", "--root", root)
    st = json.loads(text)
    assert (
        code == 0
        and st["active_slot"] == "a"
        and st["slots"]["a"]["version"] == 1
        and st["last"]["status"] == "installed"
    )
    code, text, _ = run(
        capsys,
        "ota",
        "install",
        bundles.make(2, target="rpi4"),
        "--root",
        root,
        "--key",
        keys["pub"],
        "--target",
        "x86-cpu",
    )
    assert code == 1 and "built for target 'rpi4'" in json.loads(text)["reason"]
    code, _, err = run(capsys, "ota", "status", "--root", tmp_path / "empty")
    assert code == 1 and "no model installed" in err


def test_ota_publish_refuses_a_corrupt_channel_unless_forced(
    capsys: pytest.CaptureFixture[str], bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    (store / "stable").mkdir(parents=True)
    (store / "stable" / "channel.json").write_text("{garbage")
    code, _, err = run(
        capsys, "ota", "publish", bundles.make(1), "--store", store, "--key", keys["key"]
    )
    assert code == 1 and "channel file is unusable" in err and "--force-channel" in err
    assert (store / "stable" / "channel.json").read_text() == "{garbage"
    assert (
        run(
            capsys,
            "ota",
            "publish",
            bundles.make(1),
            "--store",
            store,
            "--key",
            keys["key"],
            "--force-channel",
        )[0]
        == 0
    )


def test_ota_bad_options(
    capsys: pytest.CaptureFixture[str], bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    code, _, err = run(
        capsys,
        "ota",
        "publish",
        bundles.make(1),
        "--store",
        tmp_path,
        "--key",
        keys["key"],
        "--rollout",
        "120%",
    )
    assert code == 2 and "from 0 to 100" in err  # usage errors (issue 12, row 10)
    code, _, err = run(
        capsys,
        "ota",
        "publish",
        bundles.make(1),
        "--store",
        tmp_path,
        "--key",
        keys["key"],
        "--expires",
        "soon",
    )
    assert code == 2 and "cannot read the duration 'soon'" in err
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("root: /tmp/x\npoll_interval: 5\n")
    code, _, err = run(capsys, "ota", "agent", "--config", cfg, "--once")
    assert code == 2 and "'poll_interval'" in err
    code, _, err = run(
        capsys,
        "ota",
        "agent",
        "--once",
        "--root",
        tmp_path / "r",
        "--server",
        "http://127.0.0.1:9",
        "--target",
        "x86-cpu",
    )
    assert code == 2 and "no trusted public key configured" in err


def test_sign_several_bundles_with_the_key_from_the_environment(
    capsys: pytest.CaptureFixture[str],
    bundles: Bundles,
    keys: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(bundles.make(2, key=None), a)
    pack = tmp_path / "b.tar"
    shutil.copytree(bundles.make(3, key=None), b)
    assert run(capsys, "bundle", "pack", b, "-o", pack)[0] == 0
    monkeypatch.setenv("EDGESMITH_SIGN_KEY", str(keys["key"]))
    code, text, _ = run(capsys, "bundle", "sign", a, pack)
    assert code == 0 and len(text.splitlines()) == 2
    for bundle in (a, pack):
        code, text, _ = run(
            capsys, "bundle", "verify", bundle, "--key", keys["pub"], "--require-signature"
        )
        assert code == 0 and "signed by key" in text
