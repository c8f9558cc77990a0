"""Issue 14: the held-out gate and the OTA health check see the old task. A head fine-tuned on
the device that forgets the build's classes (measured on the bundle's shipped held-out samples)
is never installed, by ``finetune --activate`` or by the agent; one that keeps them is. Real
SmallCNN MLP-head bundles, real Fashion-MNIST and handwritten digits, real agents."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from ota_helpers import agent_config

from edgesmith.cli import main
from edgesmith.devices.ota import Agent, check_health
from edgesmith.devices.ota.local import activate
from edgesmith.runtime import load
from edgesmith.runtime.bundle import read_bundle
from tests.finetune_helpers import digits28, reversion, write_images


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("finetune-old")


@pytest.fixture(scope="module")
def device_key(work: Path) -> dict[str, Path]:
    from edgesmith.runtime.signing import generate_keypair

    k, p, _ = generate_keypair(work / "keys" / "device")
    return {"key": k, "pub": p}


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """60 training and 20 held-out real handwritten digits per class, as names."""
    x, y = digits28()
    rng = np.random.default_rng(1)
    tr, va = [], []
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(y == d))
        tr += idx[:60].tolist()
        va += idx[60:80].tolist()
    names = np.asarray([f"digit-{d}" for d in y])
    return {"xt": x[tr], "yt": names[tr], "xv": x[va], "yv": names[va]}


@pytest.fixture(scope="module")
def provisioned(
    mlp_head_bundle: Path, keys: dict[str, Path], device_key: dict[str, Path], work: Path
) -> Path:
    """A device running version 1 of the MLP-head bundle, release-signed, with its memory."""
    v1 = reversion(mlp_head_bundle, work / "mlp-v1", 1, sign_key=keys["key"])
    root = work / "template" / "dev"
    agent = Agent(agent_config(root, None, keys, device_key=device_key["key"]))
    agent.start()
    try:
        assert agent.install(v1).status == "installed"
    finally:
        agent.close()
    return root


@pytest.fixture
def dev(provisioned: Path, tmp_path: Path) -> Path:
    root = tmp_path / "dev"
    shutil.copytree(provisioned, root, symlinks=True)
    return root


@pytest.fixture(scope="module")
def forgetting(
    provisioned: Path, digits: dict[str, np.ndarray], device_key: dict[str, Path], work: Path
) -> Path:
    """Version 2, device-signed: plain fine-tuning on the digits (no memory, no isolation, no
    distillation), which calls nearly every Fashion-MNIST image a digit."""
    from edgesmith.runtime.signing import load_private_key

    out = work / "forget-v2"
    load(provisioned / "current").finetune(
        digits["xt"],
        digits["yt"],
        add_classes=True,
        holdout=(digits["xv"], digits["yv"]),
        epochs=15,
        memory=False,
        isolate=False,
        distill=0,
        out=out,
        sign_key=load_private_key(device_key["key"]),
    )
    return out


def _agent(root: Path, keys: dict, device_key: dict) -> Agent:
    agent = Agent(agent_config(root, None, keys, device_key=device_key["key"]))
    agent.start()
    return agent


def test_the_health_check_measures_a_fine_tuned_head_on_the_old_classes(
    forgetting: Path, mlp_head_bundle: Path
) -> None:
    report = check_health(forgetting)
    assert not report.ok
    old = report.old_classes
    assert old is not None and old["samples"] == 70 and old["before"] > 0.85
    assert old["after"] < 0.5 and old["reference"] == "the build's head"
    assert "forgets the old classes" in report.reason
    assert f"{old['before']:.4f} (the build's head) -> {old['after']:.4f}" in report.reason
    assert check_health(forgetting, old_class_budget=1.0).ok  # the budget is what refuses it
    assert check_health(mlp_head_bundle).old_classes is None  # a build head is not re-measured


def test_activate_refuses_a_head_that_forgets(
    dev: Path, forgetting: Path, digits: dict, keys: dict, device_key: dict
) -> None:
    agent = _agent(dev, keys, device_key)
    try:
        act = activate(agent, forgetting, (digits["xv"], digits["yv"]))
    finally:
        agent.close()
    assert act.result.status == "rolled-back"
    assert "forgets the old classes" in act.result.reason
    assert os.readlink(dev / "current") == "slots/a" and read_bundle(dev / "current").version == 1
    assert not (dev / "local" / "holdout.npz").exists()


def test_the_agent_refuses_a_forgetting_head_however_it_arrives(
    dev: Path, forgetting: Path, keys: dict, device_key: dict
) -> None:
    """A device-signed bundle installed like any update (``edgesmith ota install``) goes through
    the health check, which measures the old classes too."""
    agent = _agent(dev, keys, device_key)
    try:
        result = agent.install(forgetting)
    finally:
        agent.close()
    assert result.status == "rolled-back", result
    assert "health check failed: the fine-tuned head forgets the old classes" in result.reason
    assert read_bundle(dev / "current").version == 1


def test_finetune_activate_keeps_the_old_classes_and_says_so(
    dev: Path,
    digits: dict,
    work: Path,
    keys: dict,
    device_key: dict,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = work / "digits"
    if not data.exists():
        write_images(data / "train", digits["xt"], digits["yt"])
        write_images(data / "val", digits["xv"], digits["yv"])
    args = ["-q", "finetune", str(dev / "current"), "--data", str(data), "--add-classes"]
    args += ["--activate", "--root", str(dev), "--key", str(keys["pub"]), "--target", "x86-cpu"]
    args += ["--sign-key", str(device_key["key"]), "--epochs", "15", "--json"]
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    assert e.value.code in (0, None), err
    doc = json.loads(out)
    classes = doc["metrics"]["classes"]
    assert classes["new_classes"]["after"] >= 0.9 and classes["new_classes"]["samples"] == 200
    assert classes["old_classes"]["samples"] == 70
    assert classes["old_classes"]["after"] >= classes["old_classes"]["before"] - 0.02
    assert classes["all_classes"]["after"] > classes["all_classes"]["before"]
    act = doc["activation"]
    assert act["status"] == "installed" and act["old_classes"]["passed"]
    assert act["old_classes"]["reference"] == "installed head"
    m = read_bundle(dev / "current")
    assert m.version == 2 and len(m.labels) == 20
    report = check_health(dev / "current")
    assert report.ok and report.old_classes is not None and report.old_classes["passed"]
    # the device's own classes are kept for the next run (features, owner-only)
    replay = dev / "local" / "replay.npz"
    assert replay.is_file() and replay.stat().st_mode & 0o077 == 0


def test_policy_keep_never_reapplies_a_local_head_that_forgets_the_update_classes(
    dev: Path,
    forgetting: Path,
    mlp_head_bundle: Path,
    work: Path,
    keys: dict,
    device_key: dict,
    store_server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under ``policy: keep`` a fleet update normally gets the head fine-tuned here re-applied onto
    its backbone; a local head that loses the update's build classes (measured on the update's
    shipped held-out samples) is not, and the update's own head is installed."""
    from ota_helpers import publish

    import edgesmith.devices.ota.install as install

    assert read_bundle(mlp_head_bundle).trainable_head["policy"] == "keep"
    agent = Agent(agent_config(dev, store_server.url, keys, device_key=device_key["key"]))
    try:
        # the forgetting head got in before the old-class gate existed (an older agent)
        with monkeypatch.context() as patch:
            lenient = lambda path, *a, **k: check_health(path, *a, **k, old_class_budget=1.0)  # noqa: E731
            patch.setattr(install, "check_health", lenient)
            assert agent.install(forgetting).status == "installed"
        assert read_bundle(dev / "current").trainable_head["trained"]["by"] == "device"
        v3 = reversion(mlp_head_bundle, work / "mlp-v3", 3, sign_key=keys["key"])
        publish(store_server.root, v3, keys)
        assert agent.check_once().status == "installed"
    finally:
        agent.close()
    m = read_bundle(dev / "current")
    assert m.version == 3 and m.trainable_head["trained"]["by"] == "build"
    assert len(m.labels) == 10  # the fleet's head, not the local 20-class one
