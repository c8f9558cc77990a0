"""Property-based fuzzing (hypothesis) of the OTA parsers that read what an attacker can write.

- The channel file (``open_channel``): whoever controls the store or the network path to it.
  Inputs are raw bytes, envelopes of random JSON, and validly *signed* payloads (random JSON and
  mutations of a real channel), so the fuzzing reaches the parser behind the signature check.
- The MQTT announcement (``parse_announcement`` and the paho callback): anyone on the broker.

Property: a parser returns a well-formed value or raises its one documented error
(``UpdateError``, ``AnnouncementError``); the paho callback never raises at all.

The default suite runs a short pass (``SHORT`` examples each); the long pass is marked slow::

    EDGESMITH_FUZZ_EXAMPLES=20000 EDGESMITH_FUZZ_REPORT=fuzz.jsonl \\
        python -m pytest -m slow tests/devices/test_ota_fuzz.py -s

and prints (and appends to ``EDGESMITH_FUZZ_REPORT``) the number of cases each target tried.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesmith.devices.ota.channel import (
    PAYLOAD_TYPE,
    Channel,
    Release,
    in_rollout,
    new_channel,
    open_channel,
    parse_duration,
)
from edgesmith.devices.ota.mqtt import (
    MAX_SEQ,
    AnnouncementError,
    MqttLink,
    announce_topic,
    parse_announcement,
)
from edgesmith.errors import UpdateError
from edgesmith.runtime.signing import (
    dsse_seal,
    generate_keypair,
    load_private_key,
    load_trusted_keys,
)

SHORT = 150
LONG = int(os.environ.get("EDGESMITH_FUZZ_EXAMPLES", "20000"))

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(
        ["stable", "x86-cpu", "2026-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "0" * 64]
    )
)
json_values = st.recursive(
    json_scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4)
    ),
    max_leaves=24,
)


class Keys:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        key, pub, _ = generate_keypair(folder / "fuzz")
        self.private = load_private_key(key)
        self.trusted = load_trusted_keys([pub])


@pytest.fixture(scope="module")
def fuzz_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("fuzz-keys"))


def _valid_channel() -> dict[str, Any]:
    release = Release(
        name="fmnist-cnn",
        version=3,
        target="x86-cpu",
        path="bundles/fmnist-cnn/fmnist-cnn-3-x86-cpu.tar",
        size=1000,
        sha256="a" * 64,
        manifest_sha256="b" * 64,
        rollout=20.0,
        published="2026-01-01T00:00:00Z",
    )
    return new_channel("stable", 1_700_000_000, parse_duration("30d"), [release]).to_json()


def _mutate(doc: Any, path: list[Any], value: Any, delete: bool) -> Any:
    """``doc`` with the item at ``path`` replaced by ``value`` (or deleted). A path item picks a
    list index (modulo its length) or a dict key (a name, or an index into the sorted keys)."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, list):
        out: Any = list(doc)
        key: Any = (head if isinstance(head, int) else len(head)) % len(out)
        present = True
    else:
        out = dict(doc)
        key = head if isinstance(head, str) else sorted(out)[head % len(out)]
        present = key in out
    if delete and not rest and present:
        del out[key]
    else:
        out[key] = _mutate(out[key] if present else None, rest, value, delete)
    return out


def _check_channel(data: bytes, keys: Keys) -> None:
    try:
        ch = open_channel(data, keys.trusted, "fuzz", expect="stable", allow_expired=True)
    except UpdateError as exc:
        assert exc.message and "\n" not in exc.message
        return
    # what the agent does next with a channel must work too
    assert isinstance(ch, Channel) and isinstance(ch.seq, int) and ch.seq >= 1
    ch.expired()
    for r in ch.releases:
        assert 0 <= r.rollout <= 100 and r.size >= 1 and not r.path.startswith("/")
        in_rollout("device-1", r)


class Counter:
    def __init__(self) -> None:
        self.n = 0


def _record(name: str, counter: Counter, t0: float) -> None:
    line = {"target": name, "cases": counter.n, "seconds": round(time.monotonic() - t0, 1)}
    print(f"fuzz {name}: {counter.n} cases in {line['seconds']} s")
    report = os.environ.get("EDGESMITH_FUZZ_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps(line) + "\n")


# --------------------------------------------------------------------------- the targets


def _targets(keys: Keys, counter: Counter) -> dict[str, tuple[Any, Callable[..., None]]]:
    def raw_bytes(data: bytes) -> None:
        counter.n += 1
        _check_channel(data, keys)

    def envelope(payload: bytes, ptype: Any, sigs: Any, extra: Any) -> None:
        counter.n += 1
        env = {"payload": base64.b64encode(payload).decode(), "payloadType": ptype}
        env["signatures"] = sigs
        if isinstance(extra, dict):
            env.update(extra)
        _check_channel(json.dumps(env).encode(), keys)

    def signed_json(doc: Any) -> None:
        counter.n += 1
        payload = json.dumps(doc).encode()
        _check_channel(dsse_seal(payload, PAYLOAD_TYPE, keys.private), keys)

    def signed_mutation(path: list[Any], value: Any, delete: bool) -> None:
        counter.n += 1
        doc = _mutate(_valid_channel(), path, value, delete)
        payload = json.dumps(doc).encode()
        _check_channel(dsse_seal(payload, PAYLOAD_TYPE, keys.private), keys)

    def signed_bytes(payload: bytes) -> None:
        counter.n += 1
        _check_channel(dsse_seal(payload, PAYLOAD_TYPE, keys.private), keys)

    link = MqttLink("127.0.0.1:1", "fuzz", "stable", lambda seq: seen.append(seq))
    seen: list[int] = []

    class Msg:
        def __init__(self, payload: bytes) -> None:
            self.topic, self.payload = announce_topic("stable"), payload

    def announcement(payload: bytes) -> None:
        counter.n += 1
        try:
            seq = parse_announcement(payload, "stable")
        except AnnouncementError:
            seq = None
        else:
            assert isinstance(seq, int) and not isinstance(seq, bool) and 1 <= seq <= MAX_SEQ
        seen.clear()
        link._on_message(None, None, Msg(payload))  # the paho callback: never raises
        assert seen == ([] if seq is None else [seq])

    def announcement_json(doc: Any) -> None:
        announcement(json.dumps(doc).encode())

    def announcement_fields(seq: Any, channel: Any) -> None:
        announcement(json.dumps({"channel": channel, "seq": seq}).encode())

    path_items = st.lists(
        st.integers(min_value=0, max_value=50)
        | st.sampled_from(["seq", "releases", "rollout", "expires", "path", "version", "size"]),
        min_size=1,
        max_size=4,
    )
    return {
        "channel-bytes": ((st.binary(max_size=2048),), raw_bytes),
        "channel-envelope": (
            (st.binary(max_size=512), json_values, json_values, json_values),
            envelope,
        ),
        "channel-signed-json": ((json_values,), signed_json),
        "channel-signed-mutation": ((path_items, json_values, st.booleans()), signed_mutation),
        "channel-signed-bytes": ((st.binary(max_size=1024),), signed_bytes),
        "announcement-bytes": ((st.binary(max_size=6000),), announcement),
        "announcement-json": ((json_values,), announcement_json),
        "announcement-fields": (
            (
                json_values | st.integers() | st.floats() | st.just(MAX_SEQ + 1),
                st.sampled_from(["stable", "beta"]) | json_values,
            ),
            announcement_fields,
        ),
    }


TARGETS = [
    "channel-bytes",
    "channel-envelope",
    "channel-signed-json",
    "channel-signed-mutation",
    "channel-signed-bytes",
    "announcement-bytes",
    "announcement-json",
    "announcement-fields",
]


def _run(name: str, keys: Keys, examples: int) -> Counter:
    counter = Counter()
    strategies, fn = _targets(keys, counter)[name]
    test = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )(given(*strategies)(fn))
    t0 = time.monotonic()
    test()
    _record(name, counter, t0)
    return counter


@pytest.mark.parametrize("name", TARGETS)
def test_fuzz_short(name: str, fuzz_keys: Keys) -> None:
    assert _run(name, fuzz_keys, SHORT).n >= SHORT // 2


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGETS)
def test_fuzz_long(name: str, fuzz_keys: Keys) -> None:
    assert _run(name, fuzz_keys, LONG).n >= LONG // 2


# --------------------------------------------------------------------------- known worst cases


@pytest.mark.parametrize("depth", [1_000, 100_000, 500_000])
def test_deeply_nested_channel_files_are_refused(depth: int, fuzz_keys: Keys) -> None:
    deep = b"[" * depth + b"]" * depth
    for data in (deep, dsse_seal(deep, PAYLOAD_TYPE, fuzz_keys.private)):
        with pytest.raises(UpdateError):
            open_channel(data, fuzz_keys.trusted, "fuzz")


def test_numbers_a_channel_or_announcement_cannot_hold(fuzz_keys: Keys) -> None:
    for bad in ("1e400", "NaN", "-Infinity", "1" * 5000):
        doc = json.dumps(_valid_channel()).replace("1700000000", bad).encode()
        with pytest.raises(UpdateError):
            open_channel(dsse_seal(doc, PAYLOAD_TYPE, fuzz_keys.private), fuzz_keys.trusted, "f")
        with pytest.raises(AnnouncementError):
            parse_announcement(b'{"seq": %s}' % bad.encode(), "stable")
    assert math.isinf(float("1e400"))  # what json makes of it: int(inf) raised OverflowError
