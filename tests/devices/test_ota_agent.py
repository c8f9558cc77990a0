"""The update agent against a real HTTP store on loopback: the happy path and each fault.

After every fault the device must still run a verified, healthy model (``installed_manifest``
re-hashes the files and runs the golden check)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from ota_helpers import (
    Bundles,
    StoreServer,
    agent_config,
    installed_manifest,
    publish,
)

from edgesmith.devices.ota import Agent, Hooks, UpdateResult
from edgesmith.devices.ota.channel import CHANNEL_FILE


def run_once(
    root: Path,
    srv: StoreServer,
    keys: dict[str, Path],
    hooks: Hooks | None = None,
    step_hook: Any = None,
    **kw: Any,
) -> UpdateResult:
    agent = Agent(agent_config(root, srv.url, keys, **kw), hooks=hooks, step_hook=step_hook)
    agent.start()
    try:
        return agent.check_once()
    finally:
        agent.close()


def tar_requests(srv: StoreServer) -> list[dict[str, Any]]:
    return [r for r in srv.requests if r["path"].endswith(".tar")]


def test_update_installs_new_version_and_runs_hooks_in_order(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    calls: list[tuple[str, int, int | None, str]] = []

    def hook(ctx: Any) -> None:
        calls.append((ctx.hook, ctx.version, ctx.previous_version, os.readlink(ctx.current)))

    publish(store_server.root, bundles.make(2), keys)
    result = run_once(
        device,
        store_server,
        keys,
        hooks=Hooks(before_install=hook, after_install=hook, on_rollback=hook),
    )
    assert (result.status, result.version, result.previous) == ("installed", 2, 1)
    assert installed_manifest(device).version == 2
    assert os.readlink(device / "current") == "slots/b"
    # before_install sees the old model still current; after_install the new one
    assert calls == [("before_install", 2, 1, "slots/a"), ("after_install", 2, 1, "slots/b")]
    assert not list((device / "incoming").iterdir()), "the download is removed after install"
    status = json.loads((device / "status.json").read_text())
    assert (status["status"], status["version"], status["slot"]) == ("installed", 2, "b")
    again = run_once(device, store_server, keys)
    assert (again.status, again.version) == ("up-to-date", 2)


def test_shell_hooks_get_the_update_in_their_environment(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    log = tmp_path / "hook.log"
    publish(store_server.root, bundles.make(2), keys)
    cmd = f'echo "$EDGESMITH_HOOK $EDGESMITH_NAME $EDGESMITH_VERSION $EDGESMITH_PREVIOUS_VERSION" >> {log}'
    result = run_once(device, store_server, keys, before_install=cmd, after_install=cmd)
    assert result.status == "installed"
    assert log.read_text().splitlines() == [
        "before_install fmnist-cnn 2 1",
        "after_install fmnist-cnn 2 1",
    ]


def test_dropped_connection_resumes_with_a_range_request(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    release, _ = publish(store_server.root, bundles.make(2), keys)
    cut = release.size // 3
    store_server.faults["/" + release.path] = [("drop", cut)]
    result = run_once(device, store_server, keys)
    assert result.status == "installed", result.reason
    gets = tar_requests(store_server)
    assert [g["range"] for g in gets] == [None, f"bytes={cut}-"], (
        "resumed where it broke, not restarted"
    )
    tar_bytes = store_server.bytes_sent - sum(
        len(p.read_bytes()) for p in store_server.root.rglob(CHANNEL_FILE)
    )
    assert tar_bytes == release.size, "every byte was sent once"
    assert installed_manifest(device).version == 2


def test_resume_survives_an_agent_restart(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    release, _ = publish(store_server.root, bundles.make(2), keys)
    cut = release.size // 2
    # the connection drops on every try of the first run: the partial file stays on disk
    store_server.faults["/" + release.path] = [("drop", cut)] + [("status", 503)] * 2
    first = run_once(device, store_server, keys, download_retries=2)
    assert first.status == "failed" and f"got {cut} of {release.size}" in first.reason
    assert installed_manifest(device).version == 1
    second = run_once(device, store_server, keys)
    assert second.status == "installed"
    assert tar_requests(store_server)[-1]["range"] == f"bytes={cut}-"


def test_truncated_file_in_the_store_is_refused(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    release, _ = publish(store_server.root, bundles.make(2), keys)
    tar = store_server.root / release.path
    tar.write_bytes(tar.read_bytes()[: release.size - 1000])
    result = run_once(device, store_server, keys, download_retries=1)
    assert result.status == "failed"
    assert f"of {release.size} bytes" in result.reason and "fewer bytes" in result.reason
    assert installed_manifest(device).version == 1


def test_flipped_byte_is_refused_and_discarded(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    release, _ = publish(store_server.root, bundles.make(2), keys)
    tar = store_server.root / release.path
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0x01
    tar.write_bytes(bytes(data))
    result = run_once(device, store_server, keys)
    assert result.status == "failed" and "SHA-256" in result.reason
    assert not list((device / "incoming").iterdir()), "the corrupt download is deleted"
    assert installed_manifest(device).version == 1


def test_flipped_byte_inside_a_bundle_fails_its_file_hash(
    device: Path, bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(bundles.make(2), bad)
    model = bad / bundles.manifest.model
    data = bytearray(model.read_bytes())
    data[1000] ^= 0x10
    model.write_bytes(bytes(data))
    agent = Agent(agent_config(device, None, keys))
    agent.start()
    try:
        result = agent.install(bad)
    finally:
        agent.close()
    assert result.status == "failed" and "does not match its SHA-256" in result.reason
    assert installed_manifest(device).version == 1


def test_channel_signed_by_the_wrong_key_is_refused(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    publish(store_server.root, bundles.make(2, key="wrong_key"), keys, key="wrong_key")
    result = run_once(device, store_server, keys)
    assert result.status == "failed" and "none of which is trusted" in result.reason
    assert not tar_requests(store_server), "nothing is downloaded on an untrusted channel"
    assert installed_manifest(device).version == 1


def test_bundle_signed_by_the_wrong_key_is_refused(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    # a trusted channel pointing at a bundle signed by another key (a compromised build machine)
    release, _ = publish(store_server.root, bundles.make(2), keys)
    evil = bundles.tar(2, key="wrong_key")
    shutil.copyfile(evil, store_server.root / release.path)
    from edgesmith.devices.ota.channel import Release

    r = Release(
        **{
            **release.model_dump(),
            "size": evil.stat().st_size,
            "sha256": __import__("edgesmith.runtime.bundle", fromlist=["x"]).sha256_file(evil),
        }
    )
    from edgesmith.devices.ota.channel import new_channel, parse_duration, seal_channel
    from edgesmith.runtime.signing import load_private_key

    ch = new_channel("stable", 10**10, parse_duration("1d"), [r])
    (store_server.root / "stable" / CHANNEL_FILE).write_bytes(
        seal_channel(ch, load_private_key(keys["key"]))
    )
    result = run_once(device, store_server, keys)
    assert result.status == "failed" and "none of which is trusted" in result.reason
    assert installed_manifest(device).version == 1
    assert not list((device / "incoming").iterdir()), "the refused download is not kept"


def test_replayed_old_channel_file_is_refused(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    publish(store_server.root, bundles.make(2), keys)
    old_channel = (store_server.root / "stable" / CHANNEL_FILE).read_bytes()
    old_tar = (store_server.root / "bundles").rglob("*.tar")
    assert run_once(device, store_server, keys).status == "installed"
    publish(store_server.root, bundles.make(3), keys)
    assert run_once(device, store_server, keys).version == 3
    # an attacker (or a stale mirror) serves the older, validly signed channel file again
    (store_server.root / "stable" / CHANNEL_FILE).write_bytes(old_channel)
    assert list(old_tar)
    result = run_once(device, store_server, keys)
    assert (
        result.status == "failed"
        and "older than the" in result.reason
        and "replayed" in result.reason
    )
    assert installed_manifest(device).version == 3


def test_channel_offering_an_older_version_is_no_downgrade(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    publish(store_server.root, bundles.make(3), keys)
    assert run_once(device, store_server, keys).version == 3
    # a fresh channel (higher seq, valid signature) that points at version 2
    store2 = tmp_path / "store2"
    publish(store2, bundles.make(2), keys)
    shutil.rmtree(store_server.root)
    shutil.copytree(store2, store_server.root)
    result = run_once(device, store_server, keys)
    assert result.status == "failed" and "no downgrade" in result.reason
    assert installed_manifest(device).version == 3


def test_local_install_of_an_older_bundle_is_refused(
    device: Path, bundles: Bundles, keys: dict[str, Path]
) -> None:
    agent = Agent(agent_config(device, None, keys))
    agent.start()
    try:
        assert agent.install(bundles.make(3)).status == "installed"
        result = agent.install(bundles.make(2))
    finally:
        agent.close()
    assert result.status == "failed" and "no downgrade or replay" in result.reason
    assert installed_manifest(device).version == 3


def test_expired_channel_is_refused(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    from edgesmith.devices.ota.channel import seal_channel
    from edgesmith.runtime.signing import load_private_key

    _, ch = publish(store_server.root, bundles.make(2), keys)
    stale = ch.model_copy(update={"expires": "2020-01-01T00:00:00Z"})
    (store_server.root / "stable" / CHANNEL_FILE).write_bytes(
        seal_channel(stale, load_private_key(keys["key"]))
    )
    result = run_once(device, store_server, keys)
    assert result.status == "failed" and "expired" in result.reason and "freeze" in result.reason
    assert installed_manifest(device).version == 1


def test_model_failing_its_golden_check_is_rolled_back(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    rollbacks: list[str] = []
    publish(store_server.root, bundles.make(2, golden_scale=0.5), keys)
    hooks = Hooks(on_rollback=lambda ctx: rollbacks.append(ctx.reason))
    result = run_once(device, store_server, keys, hooks=hooks)
    assert result.status == "rolled-back" and "golden outputs differ" in result.reason
    assert len(rollbacks) == 1 and "golden" in rollbacks[0]
    assert os.readlink(device / "current") == "slots/a"
    assert installed_manifest(device).version == 1
    # the failed version is not retried at every poll
    again = run_once(device, store_server, keys)
    assert again.status == "skipped" and again.version == 1


def test_latency_budget_is_part_of_the_health_check(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    publish(store_server.root, bundles.make(2), keys)
    result = run_once(device, store_server, keys, latency_budget_ms=1e-6)
    assert result.status == "rolled-back" and "over the budget" in result.reason
    assert installed_manifest(device).version == 1


def test_failing_after_install_hook_switches_back(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    publish(store_server.root, bundles.make(2), keys)
    result = run_once(
        device, store_server, keys, after_install="echo app refused the model >&2; exit 3"
    )
    assert result.status == "rolled-back"
    assert "exited with 3" in result.reason and "app refused the model" in result.reason
    assert os.readlink(device / "current") == "slots/a"
    assert installed_manifest(device).version == 1


def test_bundle_for_another_target_is_refused(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    agent = Agent(agent_config(device, None, keys))
    agent.start()
    try:
        result = agent.install(bundles.make(2, target="rpi5"))
    finally:
        agent.close()
    assert result.status == "failed"
    assert (
        "built for target 'rpi5' (aarch64)" in result.reason
        and "'x86-cpu' (x86_64)" in result.reason
    )
    # on the channel, a release for another target is simply not this device's
    publish(store_server.root, bundles.make(2, target="rpi5"), keys)
    assert run_once(device, store_server, keys).status == "up-to-date"
    assert installed_manifest(device).version == 1


@pytest.mark.parametrize(
    "garbage", [b"{not json", b"", b'{"payload": "e30=", "payloadType": "x", "signatures": []}']
)
def test_corrupt_channel_file_is_a_clear_error(
    device: Path, store_server: StoreServer, keys: dict[str, Path], garbage: bytes
) -> None:
    (store_server.root / "stable").mkdir()
    (store_server.root / "stable" / CHANNEL_FILE).write_bytes(garbage)
    result = run_once(device, store_server, keys)
    assert result.status == "failed"
    assert CHANNEL_FILE in result.reason and (
        "corrupt" in result.reason or "holds 'x'" in result.reason
    )
    assert installed_manifest(device).version == 1


def test_unreachable_server_is_a_clear_failure(device: Path, keys: dict[str, Path]) -> None:
    from ota_helpers import free_port

    agent = Agent(agent_config(device, f"http://127.0.0.1:{free_port()}", keys))
    agent.start()
    try:
        result = agent.check_once()
    finally:
        agent.close()
    assert result.status == "failed" and "Connection refused" in result.reason
    assert installed_manifest(device).version == 1


def test_missing_key_file_stops_the_agent_before_anything_changes(
    device: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    from edgesmith.errors import EdgesmithError

    before = os.readlink(device / "current")
    agent = Agent(
        agent_config(device, "http://127.0.0.1:9", keys, trusted_keys=[tmp_path / "nope.pub"])
    )
    with pytest.raises(EdgesmithError, match="public key file not found") as exc:
        agent.start()
    assert "edgesmith keygen" in (exc.value.hint or "")
    assert os.readlink(device / "current") == before
    # the lock was released: another agent can start
    Agent(agent_config(device, None, keys)).start()


def test_second_agent_on_the_same_root_is_refused(device: Path, keys: dict[str, Path]) -> None:
    from edgesmith.errors import UpdateError

    first = Agent(agent_config(device, None, keys))
    first.start()
    try:
        with pytest.raises(UpdateError, match="another edgesmith agent is running"):
            Agent(agent_config(device, None, keys)).start()
    finally:
        first.close()


def test_injected_disk_full_during_extraction_leaves_the_old_model(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    """Disk full simulated by an injected ENOSPC at the extract step (works without root)."""

    def full(step: str) -> None:
        if step == "extract:file":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "slots/b")

    publish(store_server.root, bundles.make(2), keys)
    result = run_once(device, store_server, keys, step_hook=full)
    assert result.status == "failed" and "disk full" in result.reason
    assert not (device / "slots" / "b").exists() and not list((device / "slots").glob(".*"))
    assert not list((device / "incoming").iterdir()), "the download is removed to free space"
    assert installed_manifest(device).version == 1
    assert "txn" not in json.loads((device / "state.json").read_text())
    # once there is space again, the same version installs
    assert run_once(device, store_server, keys).status == "installed"


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Any:
    """Mount a real tmpfs of a given size (root only); yields a mount function."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root; the injected-ENOSPC test covers disk full")
    mounted: list[Path] = []

    def mount(size_kb: int) -> Path:
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(d)],
            capture_output=True,
            text=True,
        )
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_real_disk_full_on_a_small_tmpfs(
    small_tmpfs: Any,
    provisioned_v1: Path,
    store_server: StoreServer,
    bundles: Bundles,
    keys: dict[str, Path],
) -> None:
    """A real ENOSPC: another process fills the device's disk while the update is extracted."""
    release, _ = publish(store_server.root, bundles.make(2), keys)
    mnt = small_tmpfs((4 * release.size + (1 << 20)) // 1024)
    root = mnt / "dev"
    shutil.copytree(provisioned_v1, root, symlinks=True)

    def fill(step: str) -> None:
        if step == "extract":  # the free-space check passed; now the disk fills up
            with open(mnt / "filler", "wb") as f, __import__("contextlib").suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)

    result = run_once(root, store_server, keys, step_hook=fill)
    assert result.status == "failed" and "disk full" in result.reason, result.reason
    assert installed_manifest(root).version == 1
    assert not (root / "slots" / "b").exists() and not list((root / "slots").glob(".*"))
    # and with the disk still full, the next check says so up front instead of trying
    result = run_once(root, store_server, keys)
    assert result.status == "failed" and "not enough disk space" in result.reason
    assert installed_manifest(root).version == 1
    (mnt / "filler").unlink()
    assert run_once(root, store_server, keys).status == "installed"
    assert installed_manifest(root).version == 2


def test_broken_current_slot_is_replaced_by_the_other_at_start(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    publish(store_server.root, bundles.make(2), keys)
    assert run_once(device, store_server, keys).status == "installed"
    model = device / "slots" / "b" / bundles.manifest.model
    data = bytearray(model.read_bytes())
    data[500] ^= 0xFF  # bit rot on the SD card
    model.write_bytes(bytes(data))
    agent = Agent(agent_config(device, None, keys))
    agent.start()
    agent.close()
    assert os.readlink(device / "current") == "slots/a"
    assert installed_manifest(device).version == 1


def test_switch_is_atomic_for_a_watcher(
    device: Path, bundles: Bundles, keys: dict[str, Path]
) -> None:
    """What `edgesmith serve --watch` relies on: resolving `current` always gives a whole slot."""
    from edgesmith.devices.ota import Slots
    from edgesmith.runtime.bundle import read_bundle

    agent = Agent(agent_config(device, None, keys))
    agent.start()
    try:
        assert agent.install(bundles.make(2)).status == "installed"
    finally:
        agent.close()
    slots = Slots(device)
    seen: set[str] = set()
    errors: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                real = os.path.realpath(device / "current")
                seen.add(Path(real).name)
                read_bundle(real, verify=False)
            except Exception as exc:
                errors.append(repr(exc))

    t = threading.Thread(target=watch)
    t.start()
    for i in range(100):
        slots.switch("a" if i % 2 else "b")
    stop.set()
    t.join()
    assert errors == []
    assert seen == {"a", "b"}


def test_status_is_posted_to_the_report_url(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    publish(store_server.root, bundles.make(2), keys)
    result = run_once(device, store_server, keys, report_url=store_server.url + "/report")
    assert result.status == "installed"
    posts = [r["post"] for r in store_server.requests if "post" in r]
    assert len(posts) == 1
    assert (posts[0]["status"], posts[0]["version"], posts[0]["device_id"]) == (
        "installed",
        2,
        device.name,
    )
