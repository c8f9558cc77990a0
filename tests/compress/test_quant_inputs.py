"""Bad input to quantization: one clear error, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgesmith.cli import main
from edgesmith.compress.quantize.base import calibration_array
from edgesmith.compress.quantize.config import QuantizeConfig, resolve_scheme
from edgesmith.errors import DataError
from edgesmith.runtime.profiles import load_profile
from tests.conftest import write_recipe

HEAD = """\
version: 1
name: bad
model:
  factory: model.py:SmallCNN
  weights: weights.safetensors
  input: {shape: [1, 1, 28, 28], dtype: float32}
"""
FMNIST = "data: {kind: fashion-mnist, calibration: %d, eval: 200}\n"


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    _out, err = capsys.readouterr()
    return int(e.value.code or 0), err


def _no_output(parent: Path) -> bool:
    return not any(p.name.startswith((".out", "out")) for p in parent.iterdir())


def test_negative_budget_is_a_recipe_error(
    recipe_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = HEAD + FMNIST % 64 + "stages:\n  - quantize: {max_accuracy_drop: -0.01}\n"
    code, err = _run(["recipe", "check", str(write_recipe(recipe_dir, text))], capsys)
    assert code == 2 and "max_accuracy_drop must be between 0 and 1" in err and "-0.01" in err
    code, err = _run(
        [
            "quantize",
            str(write_recipe(recipe_dir, HEAD + FMNIST % 64, "r2.yaml")),
            "-o",
            str(recipe_dir / "out"),
            "--max-accuracy-drop",
            "-1",
        ],
        capsys,
    )
    assert code == 2 and "max_accuracy_drop" in err and "Traceback" not in err
    assert "r2.yaml with the given options" in err  # the flag, not the file, is at fault
    assert _no_output(recipe_dir)


def test_too_small_calibration_set(recipe_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = HEAD + FMNIST % 8 + "stages:\n  - quantize: {}\n"
    code, err = _run(
        ["build", str(write_recipe(recipe_dir, text)), "-o", str(recipe_dir / "out")], capsys
    )
    lines = err.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("error:"))
    assert code == 2 and len(lines) == i + 2 and "Traceback" not in err
    assert (
        lines[i] == "error: the calibration set has 8 samples; int8 calibration needs at least 32"
    )
    assert lines[i + 1].startswith("hint: raise data.calibration")
    assert _no_output(recipe_dir)


FACTORY = '''
import numpy as np, torch
from torch.utils.data import TensorDataset
from edgesmith.data import read_fashion_mnist

class Calib(torch.utils.data.Dataset):
    """64 real images; sample 5 was cropped to 27 columns."""
    def __init__(self, x):
        self.x = x
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        x = torch.from_numpy(self.x[i])
        return (x[..., :27] if i == 5 else x), 0

def make():
    images, labels = read_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")
    x = ((images[:300] / 255.0 - 0.286) / 0.353).astype(np.float32)[:, None]
    ds = TensorDataset(torch.from_numpy(x[:200]), torch.from_numpy(labels[:200]))
    return ds, Calib(x[200:264]), ds
'''


def test_calibration_sample_of_the_wrong_shape(
    recipe_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (recipe_dir / "calib_data.py").write_text(FACTORY)
    text = HEAD + "data: {factory: calib_data.py:make}\nstages:\n  - quantize: {}\n"
    code, err = _run(
        ["build", str(write_recipe(recipe_dir, text)), "-o", str(recipe_dir / "out")], capsys
    )
    assert code == 2
    assert "calibration sample 5 has shape [1, 28, 27] but the model takes [1, 28, 28]" in err
    assert _no_output(recipe_dir)


def test_format_the_target_cannot_run(recipe_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = HEAD + FMNIST % 64 + "target: intel-npu\nexport: [onnx]\nstages:\n  - quantize: {}\n"
    code, err = _run(
        ["build", str(write_recipe(recipe_dir, text)), "-o", str(recipe_dir / "out")], capsys
    )
    assert code == 2
    assert "error: target 'intel-npu' cannot run onnx (it runs openvino)" in err
    assert _no_output(recipe_dir)


def test_calibration_checks() -> None:
    good = [(np.zeros((1, 4, 4), np.float32), 0)] * 40
    assert calibration_array(good, None, 32, (1, 4, 4)).shape == (40, 1, 4, 4)
    assert calibration_array(good, 33, 32, (1, 4, 4)).shape == (33, 1, 4, 4)
    with pytest.raises(DataError, match="has 0 samples"):
        calibration_array([], None, 32, (1, 4, 4))
    with pytest.raises(
        DataError, match="calibration_samples=50 but the calibration set has only 40"
    ):
        calibration_array(good, 50, 32, (1, 4, 4))
    nan = [*good[:3], (np.full((1, 4, 4), np.nan, np.float32), 0)]
    with pytest.raises(DataError, match="sample 3 contains NaN"):
        calibration_array(nan, None, 2, (1, 4, 4))


@pytest.mark.parametrize(
    ("profile", "per_channel", "symmetric"),
    [
        ("x86-cpu", True, False),
        ("rpi5", True, False),
        ("intel-npu", True, True),
        ("jetson-orin-nano", True, True),
    ],
)
def test_scheme_follows_the_target_profile(
    profile: str, per_channel: bool, symmetric: bool
) -> None:
    scheme = resolve_scheme(load_profile(profile).model_dump(), QuantizeConfig())
    assert (scheme.per_channel, scheme.activations_symmetric, scheme.qdq) == (
        per_channel,
        symmetric,
        True,
    )
    forced = resolve_scheme(
        load_profile(profile).model_dump(),
        QuantizeConfig(
            activations="asymmetric-uint8", weights="per-tensor-symmetric", format="QOperator"
        ),
    )
    assert (forced.per_channel, forced.activations_symmetric, forced.qdq) == (False, False, False)
    assert resolve_scheme({}, QuantizeConfig()) == resolve_scheme({"int8": None}, QuantizeConfig())


def test_quantize_help_lists_the_budget() -> None:
    from edgesmith.cli import cli

    res = CliRunner().invoke(cli, ["quantize", "--help"])
    assert (
        res.exit_code == 0 and "--max-accuracy-drop" in res.output and "--precision" in res.output
    )


def test_format_check_applies_without_a_quantize_stage(
    recipe_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = HEAD + FMNIST % 64 + "target: rpi4\nexport: [openvino]\n"
    code, err = _run(
        ["build", str(write_recipe(recipe_dir, text)), "-o", str(recipe_dir / "out")], capsys
    )
    assert code == 2
    assert "error: target 'rpi4' cannot run openvino (it runs onnx, tflite)" in err
    assert _no_output(recipe_dir)


def test_arm_target_gets_no_openvino_int8_and_the_report_says_why(recipe_dir: Path) -> None:
    """OpenVINO's CPU plugin runs int8 convolutions with fp32 kernels on Arm: a build for an Arm
    target (here rpi5 with OpenVINO forced into its formats) keeps the fp32 IR and leaves int8 out,
    with the reason in the report, instead of a bundle the device cannot run at int8."""
    from edgesmith.pipeline import build
    from edgesmith.recipe import load_recipe

    text = (
        HEAD
        + FMNIST % 64
        + "target: {profile: rpi5, formats: [onnx, tflite, openvino]}\n"
        + "stages:\n  - quantize: {scheme: int8}\nexport: [openvino]\n"
    )
    report = build(load_recipe(write_recipe(recipe_dir, text)), recipe_dir / "out")
    assert report is not None
    (art,) = report["artifacts"]
    assert (art["format"], art["precision"]) == ("openvino", "fp32")
    assert "runs int8 convolutions with fp32 kernels" in art["skipped_variants"]["int8"]
    assert [b.name for b in (recipe_dir / "out" / "bundles").iterdir()] == ["bad-openvino-fp32"]
