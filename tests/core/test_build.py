"""The reference build end to end: report.json contract, parity, bundles, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgesmith.compress import STAGES, Stage, StageConfig
from edgesmith.errors import EdgesmithError
from edgesmith.pipeline import build
from edgesmith.recipe import load_recipe
from edgesmith.runtime import load, read_bundle
from tests.conftest import BASE_RECIPE, write_recipe
from tests.golden import assert_structure


def test_report_json_follows_the_public_contract(reference_build: Path) -> None:
    report = json.loads((reference_build / "report.json").read_text())
    assert report["name"] == "fmnist-cnn" and report["target"] == "x86-cpu"
    base = report["baseline"]
    assert set(base) >= {"accuracy", "latency_ms", "size_bytes", "macs"}
    assert 0.92 <= base["accuracy"] <= 0.94  # the committed weights score 93.0% on the 10k test set
    assert 18_000_000 < base["macs"] < 19_000_000
    assert base["size_bytes"] == 1_067_976
    assert report["stages"] == []
    (art,) = report["artifacts"]
    assert set(art) >= {
        "format",
        "precision",
        "path",
        "bundle",
        "size_bytes",
        "accuracy",
        "latency_ms",
        "parity",
    }
    assert (art["format"], art["precision"], art["path"]) == (
        "onnx",
        "fp32",
        "fmnist-cnn-onnx-fp32.onnx",
    )
    assert (reference_build / art["path"]).stat().st_size == art["size_bytes"]
    assert (reference_build / art["bundle"] / "manifest.json").is_file()
    assert art["latency_ms"] > 0
    assert_structure("report-fp32", report)  # every key of the public format, as before


def test_onnx_agrees_with_pytorch_on_the_whole_test_set(reference_build: Path) -> None:
    report = json.loads((reference_build / "report.json").read_text())
    parity = report["artifacts"][0]["parity"]
    assert parity["samples"] == 10000
    assert parity["top1_agreement"] >= 0.999
    assert parity["max_abs_diff"] <= 1e-4
    assert report["artifacts"][0]["accuracy"] == pytest.approx(
        report["baseline"]["accuracy"], abs=1e-3
    )


def test_report_md_and_plot_are_written(reference_build: Path) -> None:
    md = (reference_build / "report.md").read_text()
    assert "| `fmnist-cnn-onnx-fp32.onnx` | onnx | fp32 |" in md
    png = (reference_build / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not any(p.name.startswith(".") for p in reference_build.iterdir())  # no temp leftovers


def test_bundle_verifies_and_predicts_like_pytorch(reference_build: Path) -> None:
    from edgesmith.data import read_fashion_mnist
    from edgesmith.models import build_model

    bundle = reference_build / "bundles" / "fmnist-cnn-onnx-fp32"
    manifest = read_bundle(bundle)
    assert (
        manifest.version == 1
        and manifest.format == "onnx"
        and manifest.labels
        and manifest.labels[9] == "Ankle boot"
    )
    assert manifest.inputs[0]["shape"] == ["batch", 1, 28, 28]
    golden = np.load(bundle / "golden.npz", allow_pickle=False)
    model = load(bundle)
    np.testing.assert_allclose(
        model(golden["inputs"]), golden["outputs"], atol=manifest.golden["atol"]
    )  # type: ignore[index]
    # golden samples whose top-1 lead is over 2 atol: a CPU whose kernels stay within the
    # tolerance cannot flip their top-1 check (edgesmith.runtime.golden)
    assert manifest.golden["holds_across"] == ["x86_64", "aarch64"]  # type: ignore[index]
    top2 = np.sort(golden["outputs"], axis=1)[:, -2:]
    assert len(top2) == 8 and (top2[:, 1] - top2[:, 0] > 2 * manifest.golden["atol"]).all()  # type: ignore[index]
    # raw uint8 images go through the manifest's preprocessing and give PyTorch's answer
    images, _labels = read_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")
    recipe = load_recipe(Path(__file__).parents[2] / "examples/fashion_mnist/recipe-fp32.yaml")
    net = build_model(recipe.model)
    x = torch.from_numpy(((images[:64] / 255.0 - 0.286) / 0.353).astype(np.float32))[:, None]
    with torch.no_grad():
        expected = net(x).numpy()
    got = model(images[:64])
    np.testing.assert_allclose(got, expected, atol=1e-3)
    top = model.predict(images[:1], top_k=2)[0]
    assert top[0][0] == "Ankle boot" and top[0][1] > 0.5


class _Explode(Stage):
    name = "explode"
    config_cls = StageConfig

    def run(self, ctx):  # type: ignore[no-untyped-def]
        raise EdgesmithError("stage exploded on purpose")


@pytest.fixture
def fast_recipe(recipe_dir: Path) -> Path:
    return write_recipe(recipe_dir, BASE_RECIPE)


# a failed parity check (exit 1, nothing written): tests/core/test_checks.py


def test_a_failing_stage_leaves_nothing_and_force_keeps_the_old_output(
    fast_recipe: Path, tmp_path: Path
) -> None:
    parent = tmp_path / "builds"
    out = parent / "out"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("previous build")
    STAGES["explode"] = _Explode
    try:
        recipe = load_recipe(
            write_recipe(
                fast_recipe.parent, fast_recipe.read_text() + "stages: [explode]\n", "x.yaml"
            )
        )
        with pytest.raises(EdgesmithError, match="already exists"):
            build(recipe, out)
        with pytest.raises(EdgesmithError, match="exploded on purpose"):
            build(recipe, out, force=True)
    finally:
        del STAGES["explode"]
    assert (out / "keep.txt").read_text() == "previous build"
    assert sorted(p.name for p in parent.iterdir()) == ["out"]


def test_build_signs_bundles_and_applies_profile_overrides(
    fast_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgesmith.cli import main
    from edgesmith.runtime.signing import generate_keypair, load_trusted_keys

    private, public, _ = generate_keypair(tmp_path / "keys" / "release")
    text = fast_recipe.read_text().replace("target: x86-cpu", "target: {profile: rpi5, threads: 1}")
    recipe = write_recipe(fast_recipe.parent, text, "signed.yaml")
    out = tmp_path / "builds" / "out"
    with pytest.raises(SystemExit) as e:
        main(["-q", "build", str(recipe), "-o", str(out), "--sign-key", str(private)])
    assert e.value.code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "rpi5"
    bundle = out / report["artifacts"][0]["bundle"]
    manifest = read_bundle(bundle, trusted_keys=load_trusted_keys([public]), require_signature=True)
    assert manifest.target == "rpi5"
    (bundle / "manifest.json").write_bytes(
        (bundle / "manifest.json").read_bytes().replace(b'"rpi5"', b'"rpi4"')
    )
    with pytest.raises(EdgesmithError, match="signature"):
        read_bundle(bundle, trusted_keys=load_trusted_keys([public]), require_signature=True)


DEMO_SMALL = """\
version: 1
name: fmnist-cnn
model:
  factory: model.py:SmallCNN
  weights: weights.safetensors
  input: {shape: [1, 1, 28, 28], dtype: float32}
data: {kind: fashion-mnist, calibration: 256, eval: 1000, train: 4096}
target: x86-cpu
stages:
  - prune: {sparsity: 0.5, round_to: 16, max_accuracy_drop: 0.5}
  - distill: {epochs: 1, lr: 0.002, batch_size: 128, alpha: 0.7, max_accuracy_drop: 0.2}
  - quantize: {scheme: int8, max_accuracy_drop: 0.03}
export: [onnx, openvino, tflite]
"""


@pytest.mark.slow
def test_demo_report_structure_is_the_golden_one(recipe_dir: Path) -> None:
    """The demo's stages on less data: every key of report.json as the build before typed checks
    wrote it (golden made from that build)."""
    report = build(load_recipe(write_recipe(recipe_dir, DEMO_SMALL)), recipe_dir / "out")
    assert [s["name"] for s in report["stages"]] == ["prune", "distill", "quantize"]
    assert report["failures"] == []
    assert_structure("report-demo", report)
