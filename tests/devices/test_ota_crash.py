"""``kill -9`` of a real agent process at every step of an install.

The agent (``edgesmith ota agent --once`` in a subprocess) pauses at a named step (test hook
``EDGESMITH_OTA_TEST_PAUSE_AT``); the test then sends SIGKILL. Right after the kill - what a
power cut leaves - the device must run a verified, healthy model, old or new. A restarted agent
must then finish the update and leave no half-written state behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from ota_helpers import Bundles, StoreServer, agent_cmd, installed_manifest, publish

from edgesmith.devices.ota import STEPS

# after these steps the new slot is already `current` when the process dies
SWITCHED = {"switch:renamed", "after_install", "commit"}


def _config(root: Path, server: str, pub: Path) -> Path:
    cfg = root.parent / f"{root.name}.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "root": str(root),
                "server": server,
                "trusted_keys": [str(pub)],
                "target": "x86-cpu",
                "device_id": root.name,
                "switch_grace_s": 0,
                "retry_backoff_s": 0.01,
                "timeout_s": 10,
            }
        )
    )
    return cfg


def _wait_for_pause(proc: subprocess.Popen[bytes], step: str, timeout: float = 60) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline().decode()
        if not line:
            break
        seen.append(line)
        if line.strip() == f"edgesmith-ota: paused at {step}":
            return
    proc.kill()
    pytest.fail(f"agent never reached step {step}: {''.join(seen)[-2000:]}")


@pytest.mark.parametrize("step", STEPS)
def test_kill_9_at_every_step_leaves_a_working_model(
    step: str,
    provisioned_v1: Path,
    store_server: StoreServer,
    bundles: Bundles,
    keys: dict[str, Path],
    tmp_path: Path,
) -> None:
    release, _ = publish(store_server.root, bundles.make(2), keys)
    root = tmp_path / "dev-kill"
    shutil.copytree(provisioned_v1, root, symlinks=True)
    cfg = _config(root, store_server.url, keys["pub"])
    env = {**os.environ, "EDGESMITH_OTA_TEST_PAUSE_AT": step}
    proc = subprocess.Popen(
        agent_cmd("ota", "agent", "--once", "--config", str(cfg)),
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_pause(proc, step)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        for stream in (proc.stdin, proc.stderr):
            if stream:
                stream.close()

    # the power-cut view: a whole, verified, healthy model
    after_kill = installed_manifest(root)
    assert after_kill.version == (2 if step in SWITCHED else 1)

    restart = subprocess.run(
        agent_cmd("ota", "agent", "--once", "--config", str(cfg)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert restart.returncode == 0, restart.stderr
    assert installed_manifest(root).version == 2
    state = json.loads((root / "state.json").read_text())
    assert "txn" not in state and not state.get("failed")
    assert not list((root / "slots").glob(".*")) and not list(root.glob(".current.tmp-*"))
    assert not list((root / "incoming").iterdir())
    if step == "download:half":
        ranges = [r["range"] for r in store_server.requests if r["path"].endswith(".tar")]
        assert ranges[0] is None and ranges[-1] is not None and ranges[-1].startswith("bytes="), (
            "the restarted agent resumed the partial download"
        )
        assert int(ranges[-1][6:].rstrip("-")) >= release.size // 2
