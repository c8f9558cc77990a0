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
    for bad in ("", "-1d", "3 years"):
        with pytest.raises(UpdateError):
            parse_duration(bad)
    with pytest.raises(UpdateError):
        parse_percent("lots")
    with pytest.raises(EdgesmithError, match="cannot read the MQTT address") as exc:
        parse_hostport("broker:port")
    assert "HOST:PORT" in (exc.value.hint or "")
