"""Every agent state change is a transaction whose reported outcome matches the device.

The commit point of an update is the rename of ``current``. OS errors (disk full, EIO from
fsync, a failing rename or symlink) are injected at every step and into the system calls
themselves; after each run the reported ``version`` must be the one ``current`` points at,
``installed`` must mean the new version is in use, hooks must have run accordingly, and the
transaction must be closed (or, if even switching back failed, settled by the next check).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from ota_helpers import Bundles, StoreServer, agent_config, installed_manifest, publish

from edgesmith.devices.ota import STEPS, Agent, Hooks, UpdateResult
from edgesmith.devices.ota import slots as slots_mod
from edgesmith.runtime.bundle import read_bundle

# where an OSError at that step leaves the device: (status, version in use)
EXPECTED = {
    "check": ("failed", 1),
    "download": ("failed", 1),
    "download:half": ("failed", 1),
    "verify": ("failed", 1),
    "extract": ("failed", 1),
    "extract:file": ("failed", 1),
    "before_install": ("rolled-back", 1),
    "health": ("rolled-back", 1),
    "switch": ("rolled-back", 1),
    "switch:linked": ("rolled-back", 1),  # before the rename: the old model never left
    "switch:renamed": ("installed", 2),  # after the rename (the fsync failed): the new is in use
    "after_install": ("rolled-back", 1),
    "commit": ("installed", 2),  # after_install ran; the state write is retried
}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def hooks(self) -> Hooks:
        return Hooks(
            before_install=lambda ctx: self.calls.append("before_install"),
            after_install=lambda ctx: self.calls.append("after_install"),
            on_rollback=lambda ctx: self.calls.append("on_rollback"),
        )


def on_disk(root: Path) -> int:
    """The version ``current`` points at (read from the slot, not from the agent)."""
    return read_bundle(root / "current", verify=False).version


def assert_consistent(root: Path, result: UpdateResult, txn_open: bool = False) -> None:
    """The reported outcome is what the device holds; nothing half-done is left behind."""
    assert result.version == on_disk(root), (result, os.readlink(root / "current"))
    if result.status == "installed":
        assert on_disk(root) == result.offered
    if result.status == "rolled-back":
        assert on_disk(root) == result.previous != result.offered
    status = json.loads((root / "status.json").read_text())
    assert (status["status"], status["version"]) == (result.status, on_disk(root))
    state = json.loads((root / "state.json").read_text())
    assert ("txn" in state) == txn_open, state.get("txn")
    assert not list(root.glob(".current.tmp-*")) and not list((root / "slots").glob(".*"))
    installed_manifest(root)  # whatever is in use verifies and passes its health check


def test_an_os_error_at_any_step_is_reported_as_what_current_points_at(
    provisioned_v1: Path,
    store_server: StoreServer,
    bundles: Bundles,
    keys: dict[str, Path],
    tmp_path: Path,
) -> None:
    publish(store_server.root, bundles.make(2), keys)
    assert set(EXPECTED) == set(STEPS)
    for step in STEPS:
        root = tmp_path / f"dev-{step.replace(':', '-')}"
        shutil.copytree(provisioned_v1, root, symlinks=True)
        rec = Recorder()
        armed = [True]

        def fail(at: str, step: str = step, armed: list[bool] = armed) -> None:
            if at == step and armed[0]:
                armed[0] = False
                raise OSError(errno.EIO, os.strerror(errno.EIO), at)

        agent = Agent(agent_config(root, store_server.url, keys), hooks=rec.hooks(), step_hook=fail)
        try:
            result = agent.check_once()
        finally:
            agent.close()
        want_status, want_version = EXPECTED[step]
        assert (result.status, result.version) == (want_status, want_version), (step, result)
        assert_consistent(root, result)
        ran_before = step in ("health", "switch", "switch:linked", "switch:renamed") or step in (
            "after_install",
            "commit",
        )
        assert ("before_install" in rec.calls) == ran_before, (step, rec.calls)
        assert rec.calls.count("after_install") == (want_status == "installed"), (step, rec.calls)
        assert rec.calls.count("on_rollback") == (want_status == "rolled-back"), (step, rec.calls)


def _run(root: Path, srv: StoreServer, keys: dict[str, Path], rec: Recorder, **kw: Any) -> Agent:
    agent = Agent(agent_config(root, srv.url, keys, **kw), hooks=rec.hooks())
    agent.start()
    return agent


def test_a_failing_rename_of_current_leaves_the_old_model_and_closes_the_transaction(
    device: Path,
    store_server: StoreServer,
    bundles: Bundles,
    keys: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publish(store_server.root, bundles.make(2), keys)
    real = os.replace

    def replace(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        if str(dst).endswith("/current"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        real(src, dst, *a, **kw)

    monkeypatch.setattr(slots_mod.os, "replace", replace)
    rec = Recorder()
    agent = _run(device, store_server, keys, rec)
    try:
        result = agent.check_once()
    finally:
        agent.close()
    assert (result.status, result.version) == ("rolled-back", 1)
    assert "switching to the new model failed" in result.reason and "Input/output" in result.reason
    assert_consistent(device, result)
    assert rec.calls == ["before_install", "on_rollback"]
    monkeypatch.setattr(slots_mod.os, "replace", real)
    # a device error is not the bundle's fault: the same version installs once the disk works
    agent = _run(device, store_server, keys, rec)
    try:
        assert agent.check_once().status == "installed"
    finally:
        agent.close()
    assert on_disk(device) == 2


def test_a_failing_fsync_after_the_rename_is_an_installed_update(
    device: Path,
    store_server: StoreServer,
    bundles: Bundles,
    keys: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publish(store_server.root, bundles.make(2), keys)
    real = slots_mod.fsync_dir
    armed = [True]

    def fsync_dir(path: Path) -> None:
        if Path(path) == device and os.readlink(device / "current") == "slots/b" and armed[0]:
            armed[0] = False
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        real(path)

    monkeypatch.setattr(slots_mod, "fsync_dir", fsync_dir)
    rec = Recorder()
    agent = _run(device, store_server, keys, rec)
    try:
        result = agent.check_once()
    finally:
        agent.close()
    assert not armed[0], "the fault was injected"
    assert (result.status, result.version) == ("installed", 2)
    assert_consistent(device, result)
    assert rec.calls == ["before_install", "after_install"]


def test_disk_full_for_the_state_after_the_switch_is_installed_and_saved_later(
    device: Path,
    store_server: StoreServer,
    bundles: Bundles,
    keys: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's case: ENOSPC right after the switch. The new model is in use, so that is
    what is reported; after_install runs once; the state is written when space is back."""
    publish(store_server.root, bundles.make(2), keys)
    real = slots_mod.Slots.write_state
    full = [True]

    def write_state(self: Any, state: dict[str, Any]) -> None:
        if full[0] and os.readlink(device / "current") == "slots/b":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.state_file))
        real(self, state)

    monkeypatch.setattr(slots_mod.Slots, "write_state", write_state)
    rec = Recorder()
    agent = _run(device, store_server, keys, rec)
    try:
        result = agent.check_once()
        assert (result.status, result.version) == ("installed", 2), result
        assert result.version == on_disk(device)
        assert rec.calls == ["before_install", "after_install"]
        # the disk is still full: state.json still holds the (now finished) transaction
        assert "txn" in json.loads((device / "state.json").read_text())
        full[0] = False
        again = agent.check_once()  # the daemon's next poll: saves the state first
    finally:
        agent.close()
    assert (again.status, again.version) == ("up-to-date", 2)
    assert_consistent(device, again)
    assert rec.calls == ["before_install", "after_install"], "after_install ran once"


def test_a_failed_switch_back_is_reported_honestly_and_finished_by_the_next_check(
    device: Path,
    store_server: StoreServer,
    bundles: Bundles,
    keys: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publish(store_server.root, bundles.make(2), keys)
    real = os.symlink
    full = [True]

    def symlink(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        if full[0] and str(src) == "slots/a":  # the disk fills up: no new link for the way back
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        real(src, dst, *a, **kw)

    monkeypatch.setattr(slots_mod.os, "symlink", symlink)
    calls: list[str] = []

    def refuse(ctx: Any) -> None:
        calls.append("after_install")
        raise RuntimeError("the app refused the model")

    hooks = Hooks(after_install=refuse, on_rollback=lambda ctx: calls.append("on_rollback"))
    agent = Agent(agent_config(device, store_server.url, keys), hooks=hooks)
    agent.start()
    try:
        result = agent.check_once()
        # the new model is still in use: say so, keep the transaction open to finish it
        assert (result.status, result.version) == ("failed", 2), result
        assert "switching back failed" in result.reason and "the app refused" in result.reason
        assert_consistent(device, result, txn_open=True)
        assert calls == ["after_install"]
        full[0] = False
        again = agent.check_once()
    finally:
        agent.close()
    assert on_disk(device) == 1 and calls == ["after_install", "on_rollback"]
    assert (again.status, again.version) == ("skipped", 1), again
    assert_consistent(device, again)


def test_recovery_never_switches_to_a_version_that_was_rolled_back(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    publish(store_server.root, bundles.make(2), keys)
    agent = Agent(agent_config(device, store_server.url, keys, after_install="exit 3"))
    agent.start()
    try:
        assert agent.check_once().status == "rolled-back"
    finally:
        agent.close()
    assert (device / "slots" / "b" / "manifest.json").is_file(), "v2 is still in slot b"
    model = device / "slots" / "a" / bundles.manifest.model
    data = bytearray(model.read_bytes())
    data[500] ^= 0xFF  # bit rot in the slot in use
    model.write_bytes(bytes(data))
    agent = Agent(agent_config(device, None, keys))
    agent.start()  # recovery: slot a is broken, but slot b holds the rolled-back v2
    agent.close()
    assert os.readlink(device / "current") == "slots/a"


def _publish_channel(store: Path, bundle: Path, keys: dict[str, Path], channel: str) -> Any:
    from edgesmith.devices.ota import publish as publish_api

    return publish_api(bundle, store, channel, keys["key"])[1]


def test_moving_a_device_to_another_channel_is_no_replay(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    from edgesmith.devices.ota import refresh_channel

    beta = _publish_channel(store_server.root, bundles.make(2), keys, "beta")
    _publish_channel(store_server.root, bundles.make(2), keys, "stable")
    old_stable = (store_server.root / "stable" / "channel.json").read_bytes()
    stable = refresh_channel(store_server.root, "stable", keys["key"])
    assert stable.seq > beta.seq
    result = Agent(agent_config(device, store_server.url, keys)).run(once=True)
    assert result is not None and result.status == "installed"
    moved = Agent(agent_config(device, store_server.url, keys, channel="beta")).run(once=True)
    assert moved is not None and (moved.status, moved.version) == ("up-to-date", 2), moved
    state = json.loads((device / "state.json").read_text())
    assert state["channel_seqs"] == {"stable": stable.seq, "beta": beta.seq}
    # and a replay on one channel is still refused
    (store_server.root / "stable" / "channel.json").write_bytes(old_stable)
    back = Agent(agent_config(device, store_server.url, keys)).run(once=True)
    assert back is not None and back.status == "failed" and "replayed" in back.reason


def test_the_old_single_channel_seq_is_migrated_to_its_channel(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    beta = _publish_channel(store_server.root, bundles.make(2), keys, "beta")
    seen = beta.seq + 1000  # the device saw a later seq on 'stable' before the upgrade
    state = json.loads((device / "state.json").read_text())
    state["channel_seq"] = seen
    (device / "state.json").write_text(json.dumps(state))
    (device / "status.json").write_text(json.dumps({"channel": "stable", "channel_seq": seen}))
    result = Agent(agent_config(device, store_server.url, keys, channel="beta")).run(once=True)
    assert result is not None and result.status == "installed", result
    state = json.loads((device / "state.json").read_text())
    assert "channel_seq" not in state
    assert state["channel_seqs"] == {"stable": seen, "beta": beta.seq}


def test_a_damaged_state_file_never_stops_the_agent(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    publish(store_server.root, bundles.make(2), keys)
    state = json.loads((device / "state.json").read_text())
    state.update(
        channel_seq="many",
        failed=["x"],
        txn={"slot": "../../etc", "version": "2"},
        attempts={"m:1": None},
        rolled_back="yes",
    )
    (device / "state.json").write_text(json.dumps(state))
    result = Agent(agent_config(device, store_server.url, keys)).run(once=True)
    assert result is not None and (result.status, result.version) == ("installed", 2), result
    assert_consistent(device, result)
    (device / "state.json").write_text("[" * 100_000)
    result = Agent(agent_config(device, store_server.url, keys)).run(once=True)
    assert result is not None and (result.status, result.version) == ("up-to-date", 2), result
