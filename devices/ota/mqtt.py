"""MQTT for OTA: release announcements to devices, status reports from devices (paho-mqtt).

Topics (``edgesmith`` prefix)::

    edgesmith/<channel>/announce             retained, QoS 1: {"channel", "seq"} (a hint only)
    edgesmith/<channel>/status/<device id>   retained, QoS 1: the device's last update result

An announcement only wakes the agent: it then fetches and verifies the signed channel file over
HTTP exactly as a timed poll would, so a forged MQTT message can cause a poll, never an install.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from edgesmith.errors import EdgesmithError, UpdateError

__all__ = ["MqttLink", "announce", "announce_topic", "parse_hostport", "status_topic"]

log = logging.getLogger(__name__)

PREFIX = "edgesmith"
MAX_PAYLOAD = 64 << 10


def announce_topic(channel: str) -> str:
    return f"{PREFIX}/{channel}/announce"


def status_topic(channel: str, device_id: str) -> str:
    return f"{PREFIX}/{channel}/status/{device_id}"


def parse_hostport(text: str, default_port: int = 1883) -> tuple[str, int]:
    """``host:port`` (or ``host``) as a tuple.

    Example:
        >>> parse_hostport("broker.local:8883")
        ('broker.local', 8883)
    """
    host, sep, port = text.strip().rpartition(":") if ":" in text else (text.strip(), "", "")
    try:
        value = int(port) if sep else default_port
    except ValueError:
        value = -1
    if not host or not 0 < value < 65536:
        raise EdgesmithError(
            f"cannot read the MQTT address {text!r}", hint="write HOST:PORT, e.g. localhost:1883"
        )
    return host, value


def _paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise EdgesmithError(
            "MQTT needs the 'paho-mqtt' package", hint="pip install 'edgesmith[ota]'"
        ) from None
    return mqtt


class MqttLink:
    """One agent's MQTT connection: listens for announcements, publishes status.

    Connects in the background and reconnects by itself; the agent keeps polling over HTTP when
    the broker is down.
    """

    def __init__(
        self,
        address: str,
        client_id: str,
        channel: str,
        on_announce: Callable[[int], None] | None = None,
    ) -> None:
        mqtt = _paho()
        self.host, self.port = parse_hostport(address)
        self.channel = channel
        self.on_announce = on_announce
        self.connected = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self._client.reconnect_delay_set(min_delay=1, max_delay=60)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = lambda *a: self.connected.clear()
        self._client.on_message = self._on_message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning(
                "MQTT broker %s:%d refused the connection: %s", self.host, self.port, reason
            )
            return
        if self.on_announce is not None:
            client.subscribe(announce_topic(self.channel), qos=1)
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if len(msg.payload) > MAX_PAYLOAD:
            log.warning("ignoring an MQTT message of %d bytes on %s", len(msg.payload), msg.topic)
            return
        try:
            seq = int(json.loads(msg.payload)["seq"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed announcement on %s", msg.topic)
            return
        if self.on_announce is not None:
            self.on_announce(seq)

    def start(self, wait_s: float = 0.0) -> bool:
        """Connect in the background; wait up to ``wait_s`` for the connection. Returns connected."""
        self._client.connect_async(self.host, self.port, keepalive=60)
        self._client.loop_start()
        return self.connected.wait(wait_s) if wait_s else self.connected.is_set()

    def publish_status(self, device_id: str, status: dict[str, Any], wait_s: float = 5.0) -> bool:
        """Publish a status report (retained). Returns whether the broker acknowledged it."""
        info = self._client.publish(
            status_topic(self.channel, device_id),
            json.dumps(status, sort_keys=True),
            qos=1,
            retain=True,
        )
        if not self.connected.is_set():
            return False  # queued by paho; sent after it reconnects
        try:
            info.wait_for_publish(timeout=wait_s)
        except (RuntimeError, ValueError):
            return False
        return bool(info.is_published())

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def announce(address: str, channel: str, payload: dict[str, Any], timeout_s: float = 10.0) -> None:
    """Publish a retained announcement for ``channel`` and wait for the broker's acknowledgement.

    Raises:
        UpdateError: the broker cannot be reached or does not acknowledge in time.
    """
    mqtt = _paho()
    host, port = parse_hostport(address)
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgesmith-publisher-{channel}"
    )
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise UpdateError(
            f"cannot reach the MQTT broker at {host}:{port}: {exc}",
            hint="the release is published; devices still find it at their next poll",
        ) from None
    client.loop_start()
    try:
        info = client.publish(
            announce_topic(channel), json.dumps(payload, sort_keys=True), qos=1, retain=True
        )
        info.wait_for_publish(timeout=timeout_s)
        if not info.is_published():
            raise UpdateError(
                f"the MQTT broker at {host}:{port} did not acknowledge the announcement",
                hint="the release is published; devices still find it at their next poll",
            )
    finally:
        client.disconnect()
        client.loop_stop()
