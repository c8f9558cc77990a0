"""Fine-tuned heads through the OTA agent: activation with the held-out gate and rollback, the
device key's limited trust, the OTA ``keep``/``replace`` policy, and bad input that must leave
the installed model untouched. Real SmallCNN bundles, real Fashion-MNIST images, real agents."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from ota_helpers import agent_config, publish

from edgesmith.cli import main
from edgesmith.data import FASHION_MNIST_LABELS
from edgesmith.devices.ota import Agent
from edgesmith.errors import UpdateError
from edgesmith.runtime.bundle import read_bundle, verify_bundle
from tests.finetune_helpers import fmnist, image_folder, restrict_classes, reversion, write_images

LABELS = FASHION_MNIST_LABELS


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("finetune-ota")


@pytest.fixture(scope="module")
def device_key(work: Path) -> dict[str, Path]:
    from edgesmith.runtime.signing import generate_keypair

    k, p, _ = generate_keypair(work / "keys" / "device")
    return {"key": k, "pub": p}


@pytest.fixture(scope="module")
def b8(head_bundle: Path, keys: dict[str, Path], work: Path) -> Path:
    """Version 1 from the fleet: the SmallCNN head restricted to 8 classes, release-signed."""
    return restrict_classes(head_bundle, work / "b8-v1", 8, sign_key=keys["key"])


@pytest.fixture(scope="module")
def data(work: Path) -> Path:
    """600 training and 200 held-out real images of all 10 classes, as image folders."""
    return image_folder(work / "data", LABELS, range(600), range(600, 800))


@pytest.fixture(scope="module")
def provisioned(b8: Path, keys: dict[str, Path], device_key: dict[str, Path], work: Path) -> Path:
    root = work / "template" / "dev"
    agent = Agent(agent_config(root, None, keys, device_key=device_key["key"]))
    agent.start()
    try:
        assert agent.install(b8).status == "installed"
    finally:
        agent.close()
    (root / "status.json").unlink()
    return root


@pytest.fixture
def dev(provisioned: Path, tmp_path: Path) -> Path:
    root = tmp_path / "dev"
    shutil.copytree(provisioned, root, symlinks=True)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file's SHA-256 and every link's target under a device root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file() and p.name != "agent.lock":
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def finetune_args(
    root: Path, data: Path, keys: dict[str, Path], device_key: dict[str, Path], *extra: str
) -> list[str]:
    return [
        "-q",
        "finetune",
        str(root / "current"),
        "--data",
        str(data),
        "--activate",
        "--root",
        str(root),
        "--key",
        str(keys["pub"]),
        "--target",
        "x86-cpu",
        "--sign-key",
        str(device_key["key"]),
        *extra,
    ]


# --------------------------------------------------------------------------- activation


def test_a_better_head_is_activated_through_the_ab_switch(
    dev: Path, data: Path, keys: dict, device_key: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgesmith.devices.ota import check_health
    from edgesmith.runtime.signing import load_trusted_keys

    code, out, err = run(
        capsys, *finetune_args(dev, data, keys, device_key, "--add-classes", "--json")
    )
    assert code == 0, err
    doc = json.loads(out)
    act = doc["activation"]
    assert act["status"] == "installed" and act["version"] == 2 and act["previous"] == 1
    assert act["holdout_accuracy"] > act["previous_holdout_accuracy"] + 0.1  # it learnt 2 classes
    assert os.readlink(dev / "current") == "slots/b"
    m = read_bundle(dev / "current")
    assert m.version == 2 and m.labels[8:] == ["ankle-boot", "bag"]
    assert m.trainable_head["trained"]["by"] == "device"
    # signed by the device's key, and only by it
    assert verify_bundle(
        dev / "current", trusted_keys=load_trusted_keys([device_key["pub"]])
    ).signed_by
    with pytest.raises(Exception, match="none of which is trusted"):
        verify_bundle(dev / "current", trusted_keys=load_trusted_keys([keys["pub"]]))
    assert check_health(dev / "current").ok
    holdout = dev / "local" / "holdout.npz"
    assert holdout.stat().st_mode & 0o077 == 0  # local data: owner only
    with np.load(holdout) as z:
        assert z["x"].shape == (200, 28, 28) and "bag" in set(z["y"].tolist())
    # a restarted agent recovers into the device-signed slot, it does not switch back
    agent = Agent(agent_config(dev, None, keys, device_key=device_key["key"]))
    agent.start()
    agent.close()
    assert os.readlink(dev / "current") == "slots/b"
    assert not list(dev.glob(".finetune-*"))  # the temporary bundle is gone


def test_a_head_that_forgets_is_refused_and_the_current_one_stays(
    dev: Path,
    data: Path,
    work: Path,
    keys: dict,
    device_key: dict,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """After a first activation (its held-out samples are kept), a batch of Bag images alone
    trains a head that calls everything a bag: fine on that batch's held-out split, far worse on
    the kept samples of the other classes. Refused; the current model stays. (By default the
    device replays its earlier classes from ROOT/local/replay.npz with distillation, which keeps
    them: this run uses an empty replay file and no distillation to forget on purpose.)"""
    assert run(capsys, *finetune_args(dev, data, keys, device_key, "--add-classes"))[0] == 0
    x, y = fmnist("train")
    bags = np.flatnonzero(y == 8)[100:230]
    only_bags = work / "only-bags"
    if not only_bags.exists():
        write_images(only_bags / "train", x[bags[:100]], ["Bag"] * 100)
        write_images(only_bags / "val", x[bags[100:]], ["Bag"] * 30)
    before = snapshot(dev)
    code, _, err = run(
        capsys,
        *finetune_args(dev, only_bags, keys, device_key, "--lr", "0.05", "--epochs", "20"),
        *("--replay", str(work / "no-replay.npz"), "--distill", "0"),
    )
    assert code == 1, err
    assert (
        "error: activation rolled-back: the fine-tuned head is worse on the held-out split" in err
    )
    after = snapshot(dev)
    assert os.readlink(dev / "current") == "slots/b" and read_bundle(dev / "current").version == 2
    assert {k: v for k, v in after.items() if k.startswith(("slots/b", "local/"))} == {
        k: v for k, v in before.items() if k.startswith(("slots/b", "local/"))
    }
    state = json.loads((dev / "state.json").read_text())
    assert state.get("failed", {}) == {}  # a refused local head blocks no fleet version
    assert json.loads((dev / "status.json").read_text())["status"] == "rolled-back"


def test_revert_goes_back_to_the_fleet_head(
    dev: Path, data: Path, keys: dict, device_key: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgesmith.devices.ota import HookContext, Hooks
    from edgesmith.devices.ota.local import revert

    assert run(capsys, *finetune_args(dev, data, keys, device_key, "--add-classes"))[0] == 0
    seen: list[tuple[str, int, str]] = []

    def refuse(ctx: HookContext) -> None:
        seen.append((ctx.hook, ctx.version, ctx.reason))
        raise RuntimeError("the app is busy")

    # a revert is an install of the other slot: its hooks run, and a refusal keeps the head
    hooks = Hooks(before_install=refuse, on_rollback=lambda ctx: seen.append((ctx.hook, 0, "")))
    before = json.loads((dev / "state.json").read_text())
    agent = Agent(agent_config(dev, None, keys, device_key=device_key["key"]), hooks=hooks)
    try:
        result = agent.revert()
        assert result.status == "failed" and result.version == 2, result
        assert "the app is busy" in result.reason
        assert os.readlink(dev / "current") == "slots/b"
        assert [s[0] for s in seen] == ["before_install", "on_rollback"] and seen[0][1] == 1
        state = json.loads((dev / "state.json").read_text())
        assert "txn" not in state  # closed, and no bundle blamed for a refused revert
        assert state.get("failed") == before.get("failed")
        assert state.get("rolled_back") == before.get("rolled_back")
    finally:
        agent.close()
    seen.clear()
    agent = Agent(agent_config(dev, None, keys, device_key=device_key["key"]))
    try:
        result = revert(agent)
        assert result.status == "rolled-back" and result.version == 1
        assert os.readlink(dev / "current") == "slots/a"
        assert json.loads((dev / "status.json").read_text())["version"] == 1
        with pytest.raises(UpdateError, match="not a head fine-tuned on this device"):
            revert(agent)
    finally:
        agent.close()


# --------------------------------------------------------------------------- trust


def test_the_device_key_vouches_only_for_heads_on_fleet_models(
    dev: Path,
    b8: Path,
    head_bundle: Path,
    work: Path,
    keys: dict,
    device_key: dict,
) -> None:
    from ota_helpers import _scaled_model

    from edgesmith.runtime.bundle import write_bundle

    m = read_bundle(b8)
    doc = m.to_json()
    for k in ("schema", "files", "created"):
        doc.pop(k)
    doc["version"] = 2
    doc["trainable_head"]["trained"] = {"by": "device", "base_version": 1}
    files = {rel: b8 / rel for rel in m.files}
    head_only = work / "dev-signed-head-only"
    if not head_only.exists():
        write_bundle(head_only, doc, files, sign_key=device_key["key"])
    other = work / "dev-signed-other-model"  # a different network under the device's key
    if not other.exists():
        files[m.model] = _scaled_model(b8 / m.model, 1.0, work)
        write_bundle(other, doc, files, sign_key=device_key["key"])
    agent = Agent(agent_config(dev, None, keys, device_key=device_key["key"]))
    try:
        r = agent.install(other)
        assert r.status == "failed" and "changes more than the head" in r.reason
        assert agent.install_local(head_only).status == "installed"
    finally:
        agent.close()
    # a device that does not know this device key trusts none of its bundles
    dev2 = dev.parent / "dev2"
    shutil.copytree(dev, dev2, symlinks=True)
    (dev2 / "current").unlink()
    os.symlink("slots/a", dev2 / "current")
    stranger = Agent(agent_config(dev2, None, keys))
    try:
        r = stranger.install_local(head_only)
        assert r.status == "failed" and "none of which is trusted" in r.reason
    finally:
        stranger.close()


# --------------------------------------------------------------------------- OTA policy


def test_ota_update_keeps_or_replaces_the_local_head(
    dev: Path,
    data: Path,
    b8: Path,
    head_bundle: Path,
    work: Path,
    keys: dict,
    device_key: dict,
    store_server,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from edgesmith.devices.ota import check_health

    assert run(capsys, *finetune_args(dev, data, keys, device_key, "--add-classes"))[0] == 0
    cfg = agent_config(dev, store_server.url, keys, device_key=device_key["key"])
    # the fleet's version 1 again: nothing to do (the local head derives from it)
    publish(store_server.root, b8, keys)
    agent = Agent(cfg)
    try:
        assert agent.check_once().status == "up-to-date"
        # fleet version 2 (8 classes, policy keep): the 10-class local head is re-applied
        v2 = reversion(b8, work / "b8-v2", 2, sign_key=keys["key"])
        publish(store_server.root, v2, keys)
        r = agent.check_once()
        assert r.status == "installed" and r.version == 2, r
        m = read_bundle(dev / "current")
        assert m.version == 2 and m.labels[8:] == ["ankle-boot", "bag"]
        trained = m.trainable_head["trained"]
        assert trained["by"] == "device" and trained["base_version"] == 2
        assert (
            m.metrics["local_head"]["holdout_accuracy"]
            > m.metrics["local_head"]["update_head_holdout_accuracy"]
        )
        assert check_health(dev / "current").ok
        assert agent.check_once().status == "up-to-date"
        # fleet version 3 with policy replace: the fleet's 10-class head is installed
        v3 = reversion(
            head_bundle, work / "head-v3-replace", 3, sign_key=keys["key"], policy="replace"
        )
        publish(store_server.root, v3, keys)
        assert agent.check_once().status == "installed"
        m = read_bundle(dev / "current")
        assert m.version == 3 and m.trainable_head["trained"]["by"] == "build"
        assert m.labels == LABELS
    finally:
        agent.close()


def test_keep_yields_to_an_update_head_that_is_better_on_local_data(
    dev: Path, b8: Path, work: Path, keys: dict, device_key: dict, store_server
) -> None:
    """A bad local head (installed without the gate) loses to the update's head on the held-out
    samples stored on the device: the update's head is installed although the policy is keep."""
    from edgesmith.runtime import load
    from edgesmith.runtime.finetune import finetune_model

    x, y = fmnist("train")
    keep = np.flatnonzero(y < 8)[:500]
    shuffled = np.random.default_rng(1).permutation(y[keep[:400]])
    bad = work / "bad-local"
    if not bad.exists():
        model = load(dev / "current")
        finetune_model(
            model, x[keep[:400]], shuffled, epochs=10, out=bad, sign_key=device_key["key"]
        )
    agent = Agent(agent_config(dev, store_server.url, keys, device_key=device_key["key"]))
    try:
        assert agent.install_local(bad).status == "installed"  # no gate: deliberately bad
        (dev / "local").mkdir(exist_ok=True)
        np.savez(dev / "local" / "holdout.npz", x=x[keep[400:]], y=np.array(LABELS)[y[keep[400:]]])
        v2 = reversion(b8, work / "b8-v2", 2, sign_key=keys["key"])
        publish(store_server.root, v2, keys)
        assert agent.check_once().status == "installed"
    finally:
        agent.close()
    m = read_bundle(dev / "current")
    assert m.version == 2 and m.trainable_head["trained"]["by"] == "build"


# --------------------------------------------------------------------------- bad input


def _bad_data(kind: str, root: Path) -> Path:
    from PIL import Image

    x, y = fmnist("train")
    d = root / kind
    if kind == "empty":
        d.mkdir(parents=True)
        return d
    if kind == "no-images":
        (d / "bag").mkdir(parents=True)
        (d / "bag" / "notes.txt").write_text("no images here")
        return d
    write_images(d, x[:40], [LABELS[i] for i in y[:40] % 8])
    target = d / "coat" / "odd.png"
    target.parent.mkdir(exist_ok=True)
    if kind == "unknown-label":
        write_images(d / "hat", x[:3], ["hat"] * 3)
        return d
    if kind == "wrong-size":
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(target)
    elif kind == "rgba":
        Image.fromarray(np.zeros((28, 28, 4), np.uint8), "RGBA").save(target)
    elif kind == "rgb":
        Image.fromarray(np.zeros((28, 28, 3), np.uint8), "RGB").save(target)
    elif kind == "corrupt":
        target.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return d


BAD = {
    "unknown-label": "labels outside the model's classes: hat",
    "wrong-size": "image is 32x32; the model takes 28x28",
    "rgba": "image mode RGBA (4 channel(s)); the model takes gray",
    "rgb": "image mode RGB (3 channel(s)); the model takes gray",
    "corrupt": "cannot read image",
    "empty": "has no class folders",
    "no-images": "contains no images",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_data_is_a_clear_error_and_the_device_is_untouched(
    kind: str,
    dev: Path,
    tmp_path: Path,
    keys: dict,
    device_key: dict,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _bad_data(kind, tmp_path / "data")
    before = snapshot(dev)
    code, _, err = run(capsys, *finetune_args(dev, data, keys, device_key))
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines[0].startswith("error: ") and BAD[kind] in lines[0], err
    assert lines[1].startswith("hint: ") and "Traceback" not in err
    assert snapshot(dev) == before
    assert not list(dev.glob(".finetune-*"))


def test_a_bundle_without_trainable_head_is_refused_untouched(
    bundles,
    tmp_path: Path,
    data: Path,
    keys: dict,
    device_key: dict,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "plain"
    agent = Agent(agent_config(root, None, keys))
    agent.start()
    try:
        assert agent.install(bundles.make(1)).status == "installed"  # the reference SmallCNN
    finally:
        agent.close()
    before = snapshot(root)
    code, _, err = run(capsys, *finetune_args(root, data, keys, device_key))
    assert code == 2 and "has no trainable head: it cannot be fine-tuned" in err
    assert snapshot(root) == before


def test_finetune_without_activation_writes_nothing_on_bad_data(
    b8: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _bad_data("corrupt", tmp_path / "data")
    out = tmp_path / "v2"
    code, _, err = run(capsys, "finetune", str(b8), "--data", str(data), "-o", str(out))
    assert code == 2 and "cannot read image" in err
    assert not out.exists() and not list(tmp_path.glob(".v2*"))
