"""A simulated fleet on a real mosquitto broker and a real HTTP store: staged rollout by device-id
hash, MQTT announcements, status reports."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from ota_helpers import Bundles, StoreServer, agent_config, installed_manifest, publish

from edgesmith.devices.ota import Agent, in_rollout
from edgesmith.devices.ota.mqtt import announce, parse_hostport

FLEET = 20


class StatusBoard:
    """Subscribes to every device's retained status topic, like a fleet dashboard would."""

    def __init__(self, broker: str) -> None:
        host, port = parse_hostport(broker)
        self.latest: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dashboard")
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.subscribe("edgesmith/stable/status/+", qos=1)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            status = json.loads(msg.payload)
            self.latest[status["device_id"]] = status

    def wait(self, ids: list[str], pred: Any, timeout: float = 60) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                snap = dict(self.latest)
            if all(i in snap and pred(snap[i]) for i in ids):
                return snap
            time.sleep(0.05)
        pytest.fail(f"fleet did not report in time: {json.dumps(snap, indent=1)[:3000]}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_fleet_takes_a_staged_rollout_announced_over_mqtt(
    mqtt_broker: str,
    store_server: StoreServer,
    provisioned_v1: Path,
    bundles: Bundles,
    keys: dict[str, Path],
    tmp_path: Path,
) -> None:
    _, ch1 = publish(store_server.root, bundles.make(1), keys)
    announce(mqtt_broker, "stable", {"channel": "stable", "seq": ch1.seq})
    board = StatusBoard(mqtt_broker)
    ids = [f"dev-{i:04d}" for i in range(FLEET)]
    agents, threads = [], []
    for did in ids:
        root = tmp_path / did
        shutil.copytree(provisioned_v1, root, symlinks=True)
        agent = Agent(agent_config(root, store_server.url, keys, mqtt=mqtt_broker, device_id=did))
        agents.append(agent)
        threads.append(threading.Thread(target=agent.run, name=did, daemon=True))
    try:
        for t in threads:
            t.start()
        board.wait(ids, lambda s: s["status"] == "up-to-date" and s["version"] == 1)

        # stage 1: 20% of the fleet, chosen by a hash of the device id
        release, ch2 = publish(store_server.root, bundles.make(2), keys, rollout=20)
        announce(mqtt_broker, "stable", {"channel": "stable", "seq": ch2.seq})
        snap = board.wait(ids, lambda s: s["channel_seq"] == ch2.seq)
        cohort = {d for d in ids if in_rollout(d, release)}
        assert 1 <= len(cohort) <= FLEET // 2, "a 20% stage of 20 devices"
        for did in ids:
            expected = ("installed", 2) if did in cohort else ("not-in-rollout", 1)
            assert (snap[did]["status"], snap[did]["version"]) == expected, did
            assert installed_manifest(tmp_path / did).version == expected[1]

        # stage 2: everyone
        _, ch3 = publish(store_server.root, bundles.make(2), keys, rollout=100)
        announce(mqtt_broker, "stable", {"channel": "stable", "seq": ch3.seq})
        snap = board.wait(ids, lambda s: s["channel_seq"] == ch3.seq)
        for did in ids:
            expected_status = "up-to-date" if did in cohort else "installed"
            assert (snap[did]["status"], snap[did]["version"]) == (expected_status, 2), did
        # each device downloaded the bundle exactly once, over one connection
        tar_gets = [r for r in store_server.requests if r["path"].endswith(".tar")]
        assert len(tar_gets) == FLEET and all(r["range"] is None for r in tar_gets)
    finally:
        for a in agents:
            a.stop()
        for t in threads:
            t.join(timeout=30)
        board.close()
    assert not any(t.is_alive() for t in threads)


def test_publish_cli_announces_on_mqtt(
    mqtt_broker: str, bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    from edgesmith.cli import main

    got: list[dict[str, Any]] = []
    host, port = parse_hostport(mqtt_broker)
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="listener")
    sub.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    sub.connect(host, port)
    sub.subscribe("edgesmith/beta/announce", qos=1)
    sub.loop_start()
    try:
        with pytest.raises(SystemExit) as exc:
            main(
                [
                    "ota",
                    "publish",
                    str(bundles.make(1)),
                    "--store",
                    str(tmp_path / "s"),
                    "--channel",
                    "beta",
                    "--key",
                    str(keys["key"]),
                    "--mqtt",
                    mqtt_broker,
                ]
            )
        assert exc.value.code == 0
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sub.loop_stop()
        sub.disconnect()
    seq = json.loads(
        __import__("base64").b64decode(
            json.loads((tmp_path / "s/beta/channel.json").read_text())["payload"]
        )
    )["seq"]
    assert got == [{"channel": "beta", "seq": seq}]
