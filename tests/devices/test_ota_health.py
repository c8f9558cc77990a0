"""The health check: load, golden outputs within tolerance, latency budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ota_helpers import Bundles

from edgesmith.devices.ota import check_health
from edgesmith.runtime.bundle import read_bundle, write_bundle


def test_reference_bundle_is_healthy(bundles: Bundles) -> None:
    r = check_health(bundles.make(2), latency_budget_ms=1000)
    assert r.ok and r.golden and r.top1_agreement == 1.0
    assert r.max_abs_diff is not None and r.max_abs_diff < 1e-4
    assert r.latency_ms is not None and 0 < r.latency_ms < 1000


def test_changed_model_fails_its_golden_check(bundles: Bundles) -> None:
    r = check_health(bundles.make(2, golden_scale=0.5))
    assert not r.ok and "golden outputs differ by up to" in r.reason
    assert r.max_abs_diff is not None and r.max_abs_diff > 0.5


def test_bundle_without_golden_data(bundles: Bundles, tmp_path: Path) -> None:
    m = read_bundle(bundles.ref).to_json()
    for k in ("schema", "files", "created", "golden"):
        m.pop(k)
    plain = tmp_path / "plain"
    write_bundle(plain, m, {bundles.manifest.model: bundles.ref / bundles.manifest.model})
    r = check_health(plain)
    assert r.ok and not r.golden  # it loads and runs once on zeros
    r = check_health(plain, require_golden=True)
    assert not r.ok and "no golden data" in r.reason


def test_unloadable_model_is_unhealthy(bundles: Bundles, tmp_path: Path) -> None:
    m = read_bundle(bundles.ref).to_json()
    for k in ("schema", "files", "created"):
        m.pop(k)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not an onnx model" * 10)
    bad = tmp_path / "bad"
    write_bundle(
        bad,
        {**m, "model": "junk.onnx"},
        {"junk.onnx": junk, "golden.npz": bundles.ref / "golden.npz"},
    )
    r = check_health(bad)
    assert not r.ok and r.reason.startswith("the model does not load")


def test_nan_outputs_fail(bundles: Bundles, tmp_path: Path) -> None:
    m = read_bundle(bundles.ref).to_json()
    for k in ("schema", "files", "created"):
        m.pop(k)
    with np.load(bundles.ref / "golden.npz") as g:
        inputs = g["inputs"]
    np.savez(
        tmp_path / "golden.npz",
        inputs=inputs,
        outputs=np.full((len(inputs), 10), np.nan, np.float32),
    )
    b = tmp_path / "b"
    write_bundle(
        b,
        m,
        {
            bundles.manifest.model: bundles.ref / bundles.manifest.model,
            "golden.npz": tmp_path / "golden.npz",
        },
    )
    r = check_health(b)
    assert not r.ok and "differ" in r.reason
