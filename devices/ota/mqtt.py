"""MQTT for OTA: release announcements to devices, status reports from devices (paho-mqtt).

Topics (``edgesmith`` prefix)::

    edgesmith/<channel>/announce             retained, QoS 1: {"channel", "seq"} (a hint only)
    edgesmith/<channel>/status/<device id>   retained, QoS 1: the device's last update result

An announcement only wakes the agent: it then fetches and verifies the signed channel file over
HTTP exactly as a timed poll would, so a forged MQTT message can cause a poll, never an install
(and the agent coalesces announcements: at most one poll per ``announce_min_interval_s``).

Anyone who can publish on the broker can send anything, so :func:`parse_announcement` is strict
and bounded (size, nesting depth, types, integer range) and nothing raised while handling a
message reaches paho's network thread (an exception there would end it, and with it every later
announcement).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from edgesmith.errors import EdgesmithError, UpdateError

__all__ = [
    "AnnouncementError",
    "MqttLink",
    "announce",
    "announce_topic",
    "parse_announcement",
    "parse_hostport",
    "status_topic",
]

log = logging.getLogger(__name__)

PREFIX = "edgesmith"
MAX_ANNOUNCEMENT = 4 << 10  # a real one is ~40 bytes
MAX_DEPTH = 4  # {"channel": ..., "seq": ...} is depth 1; room for small future fields
MAX_SEQ = (1 << 63) - 1


class AnnouncementError(ValueError):
    """An MQTT announcement that is not one (ignored, with a log line)."""


def _depth(data: bytes) -> int:
    """The deepest nesting of JSON arrays/objects in ``data`` (brackets inside strings skipped)."""
    depth = deepest = 0
    in_str = escaped = False
    for c in data:
        if in_str:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif c in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise AnnouncementError(f"{name} is not a number an announcement may hold")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:
        raise AnnouncementError("an integer with more than 19 digits")
    return int(text)


def parse_announcement(payload: bytes, channel: str) -> int:
    """The ``seq`` of an announcement for ``channel``: ``{"channel": channel, "seq": N}``.

    ``N`` must be a JSON integer in [1, 2**63); ``channel``, if present, must be this channel;
    other keys are ignored. At most ``MAX_ANNOUNCEMENT`` bytes and ``MAX_DEPTH`` levels.

    Raises:
        AnnouncementError: anything else (never another exception).

    Example:
        >>> parse_announcement(b'{"channel": "stable", "seq": 17}', "stable")
        17
    """
    if not isinstance(payload, (bytes, bytearray)):
        raise AnnouncementError("the payload is not bytes")
    if len(payload) > MAX_ANNOUNCEMENT:
        raise AnnouncementError(f"{len(payload)} bytes, over the {MAX_ANNOUNCEMENT}-byte limit")
    if _depth(payload) > MAX_DEPTH:
        raise AnnouncementError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        doc = json.loads(
            bytes(payload).decode("utf-8"),
            parse_constant=_no_constant,
            parse_int=_bounded_int,
        )
    except AnnouncementError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError too
        raise AnnouncementError(f"not JSON: {type(exc).__name__}") from None
    if not isinstance(doc, dict):
        raise AnnouncementError("not a JSON object")
    seq = doc.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= MAX_SEQ:
        raise AnnouncementError("'seq' is not an integer from 1 to 2**63-1")
    if "channel" in doc and doc["channel"] != channel:
        raise AnnouncementError("for another channel")
    return seq


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
        try:
            self._connected(client, reason)
        except Exception:  # never into paho's network thread
            log.exception("MQTT on_connect failed")

    def _connected(self, client: Any, reason: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning(
                "MQTT broker %s:%d refused the connection: %s", self.host, self.port, reason
            )
            return
        if self.on_announce is not None:
            client.subscribe(announce_topic(self.channel), qos=1)
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        # runs in paho's network thread: an exception escaping here would end that thread
        try:
            if msg.topic != announce_topic(self.channel):
                return
            seq = parse_announcement(msg.payload, self.channel)
            if self.on_announce is not None:
                self.on_announce(seq)
        except AnnouncementError as exc:
            log.warning("ignoring a malformed announcement on %s: %s", self.channel, exc)
        except Exception:
            log.exception("handling an MQTT message failed")

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
