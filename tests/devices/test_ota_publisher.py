"""The publisher and the channel file: store layout, versions, rollout, expiry, seq."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from ota_helpers import Bundles, publish

from edgesmith.devices.ota import in_rollout, read_channel, refresh_channel, rollout_bucket
from edgesmith.devices.ota.channel import open_channel, parse_duration, parse_percent
from edgesmith.devices.ota.mqtt import parse_hostport
from edgesmith.errors import EdgesmithError, UpdateError
from edgesmith.runtime.bundle import sha256_file, verify_bundle
from edgesmith.runtime.signing import load_trusted_keys


def test_publish_writes_an_immutable_bundle_and_a_signed_channel(
    bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    release, ch = publish(store, bundles.make(2), keys, rollout=25)
    tar = store / release.path
    assert release.path == "bundles/fmnist-cnn/fmnist-cnn-2-x86-cpu.tar"
    assert (release.size, release.sha256) == (tar.stat().st_size, sha256_file(tar))
    assert (
        release.manifest_sha256
        == hashlib.sha256((bundles.make(2) / "manifest.json").read_bytes()).hexdigest()
    )
    assert (
        verify_bundle(tar, trusted_keys=[keys["pub"]], require_signature=True).manifest.version == 2
    )
    read = read_channel(store, "stable", load_trusted_keys([keys["pub"]]))
    assert read == ch and read.releases == [release] and read.releases[0].rollout == 25
    with pytest.raises(UpdateError, match="none of which is trusted"):
        read_channel(store, "stable", load_trusted_keys([keys["wrong_pub"]]))


def test_versions_only_go_up(bundles: Bundles, keys: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    _, ch2 = publish(store, bundles.make(2), keys)
    _, ch3 = publish(store, bundles.make(3), keys)
    assert ch3.seq > ch2.seq and [r.version for r in ch3.releases] == [3]
    with pytest.raises(UpdateError, match="refusing to publish older version 2") as exc:
        publish(store, bundles.make(2), keys)
    assert "publish a new, higher version" in (exc.value.hint or "")
    # same version again: only rollout and expiry change; different bytes under it: refused
    _, ch = publish(store, bundles.make(3), keys, rollout=50)
    assert ch.releases[0].rollout == 50 and ch.seq > ch3.seq
    with pytest.raises(UpdateError, match="already published with different contents"):
        publish(store, bundles.make(3, golden_scale=0.1), keys)


def test_releases_for_several_targets_share_a_channel(
    bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    publish(store, bundles.make(2), keys)
    _, ch = publish(store, bundles.make(4, target="rpi5"), keys)
    assert sorted((r.target, r.version) for r in ch.releases) == [("rpi5", 4), ("x86-cpu", 2)]


def test_tampered_channel_payload_is_refused(
    bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    import base64

    store = tmp_path / "store"
    publish(store, bundles.make(2), keys, rollout=10)
    path = store / "stable" / "channel.json"
    env = json.loads(path.read_bytes())
    payload = base64.b64decode(env["payload"]).replace(b'"rollout": 10.0', b'"rollout": 100.0')
    env["payload"] = base64.b64encode(payload).decode()
    with pytest.raises(UpdateError, match="does not match the signed bytes"):
        open_channel(json.dumps(env).encode(), load_trusted_keys([keys["pub"]]), "channel.json")


def test_refresh_extends_expiry_with_a_higher_seq(
    bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    _, ch = publish(store, bundles.make(2), keys, expires="1h")
    new = refresh_channel(store, "stable", keys["key"], "60d")
    assert new.seq > ch.seq and new.expires > ch.expires and new.releases == ch.releases
    with pytest.raises(UpdateError, match="no channel 'beta'"):
        refresh_channel(store, "beta", keys["key"])


def test_rollout_buckets_are_stable_and_uniform() -> None:
    ids = [f"device-{i}" for i in range(4000)]
    buckets = [rollout_bucket(d, "m", 2) for d in ids]
    assert all(0 <= b < 100 for b in buckets)
    assert rollout_bucket("device-1", "m", 2) == buckets[1], "stable for a device and release"
    share = sum(b < 20 for b in buckets) / len(ids)
    assert 0.17 < share < 0.23, share
    # growing the percentage only adds devices: nobody who had it loses it
    from edgesmith.devices.ota.channel import Release

    def rel(p: float) -> Release:
        return Release(
            name="m",
            version=2,
            target="x86-cpu",
            path="b/m.tar",
            size=1,
            sha256="0" * 64,
            manifest_sha256="0" * 64,
            rollout=p,
            published="2026-01-01T00:00:00Z",
        )

    at20 = {d for d in ids if in_rollout(d, rel(20))}
    at50 = {d for d in ids if in_rollout(d, rel(50))}
    assert at20 < at50 and not {d for d in ids if in_rollout(d, rel(0))}
    assert len({d for d in ids if in_rollout(d, rel(100))}) == len(ids)


def test_parsers() -> None:
    assert parse_duration("30d").days == 30 and parse_duration("90m").seconds == 5400
    assert parse_percent("20%") == 20.0 and parse_percent(5) == 5.0
    assert parse_hostport("broker:8883") == ("broker", 8883) and parse_hostport("broker") == (
        "broker",
        1883,
    )
    for bad in ("", "-1d", "3 years", "0d", "0.0s", "99999999999d", "11000d", "1e400s"):
        with pytest.raises(EdgesmithError) as exc:
            parse_duration(bad)
        assert exc.value.exit_code == 2, "a usage error"
    for bad_pct in ("lots", "120%", "-1", "nan", "inf"):
        with pytest.raises(EdgesmithError) as exc:
            parse_percent(bad_pct)
        assert exc.value.exit_code == 2
    with pytest.raises(EdgesmithError, match="cannot read the MQTT address") as exc:
        parse_hostport("broker:port")
    assert "HOST:PORT" in (exc.value.hint or "")


# --------------------------------------------------------------------------- concurrent publishers

_PUBLISHER = """
import sys, time
from pathlib import Path
from edgesmith.cli import main
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.005)
main(sys.argv[3:])
"""


def test_concurrent_publishes_from_separate_processes_all_land(
    bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    """Four real processes publish four releases into one store at the same moment."""
    import subprocess
    import sys
    import time

    store = tmp_path / "store"
    targets = ["x86-cpu", "rpi5", "rpi4", "intel-cpu"]
    procs = []
    for t in targets:
        cmd = [sys.executable, "-c", _PUBLISHER, str(tmp_path / f"ready-{t}"), str(tmp_path / "go")]
        cmd += ["ota", "publish", str(bundles.make(2, target=t)), "--store", str(store)]
        cmd += ["--key", str(keys["key"])]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{t}").exists() for t in targets):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    (tmp_path / "go").touch()  # all start their read-modify-write of channel.json together
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1].decode()[-500:] for o in outs]
    ch = read_channel(store, "stable", load_trusted_keys([keys["pub"]]))
    assert ch is not None and sorted(r.target for r in ch.releases) == sorted(targets), (
        "no release was lost"
    )


def test_a_channel_changed_behind_the_lock_fails_the_publish_loudly(
    bundles: Bundles, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that does not take the lock (an old edgesmith, a hand edit) changes the channel
    while a publish runs: compare-and-swap refuses to overwrite it."""
    from edgesmith.devices.ota import publisher

    store = tmp_path / "store"
    publish(store, bundles.make(2), keys)
    real_pack = publisher.pack_bundle

    def pack_and_race(*a: object, **kw: object) -> object:
        publisher._write_channel(  # the other writer, between our read and our write
            store,
            publisher.new_channel("stable", 10**10, parse_duration("1d"), []),
            publisher.load_private_key(keys["key"]),
            publisher._channel_bytes(store, "stable"),
        )
        return real_pack(*a, **kw)

    monkeypatch.setattr(publisher, "pack_bundle", pack_and_race)
    with pytest.raises(UpdateError, match="changed while this publish was running"):
        publish(store, bundles.make(2, target="rpi5"), keys)
    ch = read_channel(store, "stable", load_trusted_keys([keys["pub"]]))
    assert ch is not None and ch.seq == 10**10, "the other writer's channel was not overwritten"


def test_a_held_store_lock_makes_a_publish_fail_not_wait_forever(
    bundles: Bundles, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    from edgesmith.devices.ota import publisher

    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setattr(publisher, "LOCK_WAIT_S", 0.3)
    with open(store / publisher.LOCK_FILE, "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(UpdateError, match="another publisher has held"):
            publish(store, bundles.make(2), keys)
    assert not (store / "stable").exists()
