"""Every network wait of the agent has a deadline, and the MQTT side cannot be used against it.

A real HTTP store on loopback trickles bytes (a slowloris server); a real mosquitto broker
carries malformed and forged announcements."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from ota_helpers import Bundles, StoreServer, agent_config, installed_manifest, publish

from edgesmith.devices.ota import Agent, UpdateResult
from edgesmith.devices.ota.mqtt import MqttLink, announce, parse_hostport
from edgesmith.errors import UpdateError


def run_in_thread(agent: Agent, limit_s: float) -> tuple[UpdateResult | None, float]:
    """``agent.run(once=True)``, which must be over within ``limit_s`` (the test's own bound)."""
    out: list[UpdateResult | None] = []
    t0 = time.monotonic()
    t = threading.Thread(target=lambda: out.append(agent.run(once=True)), daemon=True)
    t.start()
    t.join(limit_s)
    assert not t.is_alive(), f"the agent is still in its check after {limit_s} s"
    return out[0], time.monotonic() - t0


@pytest.mark.parametrize(
    "deadline",
    [{"download_deadline_s": 2.0}, {"check_deadline_s": 2.0}],
    ids=lambda d: next(iter(d)),
)
def test_a_trickling_store_cannot_hold_the_agent_past_its_deadline(
    deadline: dict[str, float],
    device: Path,
    store_server: StoreServer,
    bundles: Bundles,
    keys: dict[str, Path],
) -> None:
    """The issue's case: one byte every 0.2 s (per-read timeouts never fire)."""
    release, _ = publish(store_server.root, bundles.make(2), keys)
    store_server.faults["/" + release.path] = [("trickle", 200)] * 20
    agent = Agent(
        agent_config(device, store_server.url, keys, timeout_s=1.0, min_download_rate=0, **deadline)
    )
    result, took = run_in_thread(agent, 30)
    assert result is not None and result.status == "failed", result
    assert "deadline of 2 s" in result.reason and "got " in result.reason, result.reason
    assert took < 15
    assert installed_manifest(device).version == 1
    # the root's lock is free again, and the partial file is kept for a later resume
    assert list((device / "incoming").glob("*.part"))
    store_server.faults.clear()
    again = Agent(agent_config(device, store_server.url, keys)).run(once=True)
    assert again is not None and again.status == "installed"
    ranges = [r["range"] for r in store_server.requests if r["path"].endswith(".tar")]
    assert ranges[-1] is not None, "the next check resumed where the trickle stopped"


def test_a_connection_under_the_minimum_rate_is_dropped_and_resumed(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    release, _ = publish(store_server.root, bundles.make(2), keys)
    store_server.faults["/" + release.path] = [("trickle", 50)] * 3  # ~20 bytes/s
    agent = Agent(
        agent_config(
            device,
            store_server.url,
            keys,
            timeout_s=1.0,
            min_download_rate=1000,
            download_retries=2,
        )
    )
    result, took = run_in_thread(agent, 30)
    assert result is not None and result.status == "failed", result
    assert "under the minimum of 1000" in result.reason, result.reason
    tars = [r for r in store_server.requests if r["path"].endswith(".tar")]
    assert len(tars) == 3 and tars[0]["range"] is None and tars[-1]["range"] is not None
    assert took < 20
    assert installed_manifest(device).version == 1


@pytest.mark.parametrize("fault", ["trickle", "trickle-headers"])
def test_a_trickled_channel_file_fails_within_the_timeout(
    fault: str, device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    publish(store_server.root, bundles.make(2), keys)
    store_server.faults["/stable/channel.json"] = [(fault, 200)]
    agent = Agent(agent_config(device, store_server.url, keys, timeout_s=1.5))
    result, took = run_in_thread(agent, 30)
    assert result is not None and result.status == "failed", result
    assert "request deadline of 1.5 s" in result.reason, result.reason
    assert took < 10


def test_a_trickling_status_endpoint_cannot_hold_the_agent(
    device: Path, store_server: StoreServer, bundles: Bundles, keys: dict[str, Path]
) -> None:
    store_server.faults["/report"] = [("trickle-headers", 200)]
    agent = Agent(
        agent_config(device, None, keys, timeout_s=1.5, report_url=store_server.url + "/report")
    )
    agent.start()
    t0 = time.monotonic()
    try:
        result = agent.install(bundles.make(2))
    finally:
        agent.close()
    assert result.status == "installed"
    assert time.monotonic() - t0 < 20
    assert [r for r in store_server.requests if r["path"] == "/report"]


def test_a_silent_mqtt_broker_cannot_hold_a_publisher_or_an_agent(
    device: Path, keys: dict[str, Path]
) -> None:
    """A TCP server that accepts and never answers: every MQTT wait is bounded."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[Any] = []
    threading.Thread(
        target=lambda: [held.append(srv.accept()) for _ in range(4)], daemon=True
    ).start()
    address = f"127.0.0.1:{srv.getsockname()[1]}"
    try:
        t0 = time.monotonic()
        with pytest.raises(UpdateError, match="did not acknowledge"):
            announce(address, "stable", {"channel": "stable", "seq": 1}, timeout_s=1.0)
        assert time.monotonic() - t0 < 10
        t0 = time.monotonic()
        result = Agent(agent_config(device, None, keys, mqtt=address)).run(once=True)
        assert result is not None and result.status == "failed"  # no server: nothing to poll
        assert time.monotonic() - t0 < 20
    finally:
        srv.close()
        for conn, _ in held:
            conn.close()


# --------------------------------------------------------------------------- MQTT


def _client(broker: str, cid: str) -> Any:
    host, port = parse_hostport(broker)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid)
    c.connect(host, port)
    c.loop_start()
    return c


BAD_ANNOUNCEMENTS = [
    b'{"channel": "sec-test", "seq": 1e400}',  # the case: OverflowError in int(inf)
    b'{"seq": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",  # RecursionError in json
    b'{"seq": NaN}',
    b'{"seq": Infinity}',
    b'{"seq": "7"}',
    b'{"seq": true}',
    b'{"seq": -3}',
    b'{"seq": ' + b"9" * 5000 + b"}",
    b'{"seq": 9223372036854775808}',
    b"\xff\xfe{}",
    b"[1, 2]",
    b'{"channel": "other", "seq": 5}',
    b"x" * (1 << 20),
    b"",
]


def test_malformed_announcements_never_stop_the_listener(mqtt_broker: str) -> None:
    got: list[int] = []
    link = MqttLink(mqtt_broker, "sec-listener", "sec-test", got.append)
    assert link.start(wait_s=10), "connected to the broker"
    pub = _client(mqtt_broker, "sec-forger")
    try:
        for payload in BAD_ANNOUNCEMENTS:
            pub.publish("edgesmith/sec-test/announce", payload, qos=1).wait_for_publish(5)
        pub.publish("edgesmith/sec-test/announce", b'{"channel": "sec-test", "seq": 42}', qos=1)
        deadline = time.monotonic() + 15
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [42], "the valid announcement after the bad ones still arrived"
        assert link._client._thread is not None and link._client._thread.is_alive()
    finally:
        pub.loop_stop()
        pub.disconnect()
        link.stop()


def test_an_announcement_storm_costs_one_channel_fetch_per_interval(
    mqtt_broker: str,
    device: Path,
    store_server: StoreServer,
    bundles: Bundles,
    keys: dict[str, Path],
) -> None:
    from edgesmith.devices.ota import publish as publish_api

    publish_api(bundles.make(1), store_server.root, "storm", keys["key"])
    agent = Agent(
        agent_config(
            device,
            store_server.url,
            keys,
            mqtt=mqtt_broker,
            channel="storm",
            announce_min_interval_s=1.0,
        )
    )

    def fetches() -> int:
        return sum(r["path"] == "/storm/channel.json" for r in store_server.requests)

    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    pub = _client(mqtt_broker, "sec-storm")
    try:
        deadline = time.monotonic() + 30
        while (fetches() < 1 or agent.last_result is None) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fetches() == 1 and agent.last_result is not None
        base = 10**15  # forged seqs far above the real one: each looks new
        t0 = time.monotonic()
        for i in range(300):
            payload = json.dumps({"channel": "storm", "seq": base + i})
            pub.publish("edgesmith/storm/announce", payload, qos=0)
            time.sleep(0.005)
        while time.monotonic() - t0 < 3.0:
            time.sleep(0.05)
        during = fetches() - 1
        elapsed = time.monotonic() - t0
    finally:
        pub.loop_stop()
        pub.disconnect()
        agent.stop()
        t.join(30)
    assert not t.is_alive()
    # at most one fetch per started second of the storm (plus the one in progress)
    assert 1 <= during <= elapsed / 1.0 + 1, (during, elapsed)
