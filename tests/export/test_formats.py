"""TFLite and OpenVINO exporters: one signature, parity with PyTorch, op-support diagnosis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgesmith.errors import UnsupportedOpError
from edgesmith.export import EXPORTERS, get_exporter
from edgesmith.export.parity import compare_outputs
from edgesmith.runtime import load


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))


class _Inner(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.histc(x, bins=4)


class _Hist(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 8), _Inner())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    n = _Net()
    with torch.no_grad():  # non-trivial batch-norm statistics
        n.bn.running_mean.uniform_(-0.5, 0.5)
        n.bn.running_var.uniform_(0.5, 2.0)
    return n.eval()


@pytest.mark.parametrize("fmt", ["openvino", "tflite"])
def test_export_agrees_with_pytorch(fmt: str, net: torch.nn.Module, tmp_path: Path) -> None:
    spec = EXPORTERS[fmt]
    path = get_exporter(fmt)(net, (torch.randn(1, 3, 16, 16),), tmp_path / f"net{spec.suffix}")
    assert path == tmp_path / f"net{spec.suffix}"
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(f.name for f in spec.files(path))  # no temporary files left behind
    model = load(path)
    assert model.info["backend"] == spec.backend
    x = torch.randn(7, 3, 16, 16)  # a larger batch than the example
    with torch.no_grad():
        expected = net(x).numpy()
    got = model(x.numpy())
    parity = compare_outputs(expected, got, top1_agreement=1.0, max_abs_diff=1e-5)
    assert parity.passed, parity.reason


def test_openvino_keeps_fp32_weights_unless_asked(net: torch.nn.Module, tmp_path: Path) -> None:
    x = torch.randn(1, 3, 16, 16)
    full = get_exporter("openvino")(net, (x,), tmp_path / "full.xml")
    half = get_exporter("openvino")(net, (x,), tmp_path / "half.xml", compress_to_fp16=True)
    full_bin, half_bin = (
        full.with_suffix(".bin").stat().st_size,
        half.with_suffix(".bin").stat().st_size,
    )
    assert 0.45 < half_bin / full_bin < 0.6  # FP16 weights are half the size, by request only
    xb = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        expected = net(xb).numpy()
    exact = np.abs(load(full)(xb.numpy()) - expected).max()
    rounded = np.abs(load(half)(xb.numpy()) - expected).max()
    assert exact < 1e-5 < rounded < 1e-2
    assert load(full).inputs[0].shape == ("batch", 3, 16, 16)
    assert [s.name for s in load(full).outputs] == ["output"]


@pytest.mark.parametrize("fmt", ["openvino", "tflite"])
def test_unsupported_op_names_op_layer_and_workarounds(fmt: str, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedOpError) as e:
        get_exporter(fmt)(
            _Hist().eval(), (torch.randn(2, 8),), tmp_path / f"h{EXPORTERS[fmt].suffix}"
        )
    err = e.value
    assert "histc" in err.op and err.format == fmt
    assert err.layer == "body.1"  # found with torch.export's module stack, not guessed
    assert err.message.startswith(f"{fmt} cannot express operator")
    assert "test_formats.py" in err.message  # the source line that calls the op
    others = [f for f in EXPORTERS if f != fmt]
    assert all(o in (err.hint or "") for o in others) and f"export to {fmt}" not in (err.hint or "")
    assert "replace the module" in (err.hint or "")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_export_command_writes_the_ir_pair(recipe_dir: Path) -> None:
    from click.testing import CliRunner

    from edgesmith.cli import cli
    from tests.conftest import BASE_RECIPE, write_recipe

    recipe = write_recipe(recipe_dir, BASE_RECIPE)
    out = recipe_dir / "model" / "fmnist.xml"
    res = CliRunner().invoke(cli, ["export", str(recipe), "-f", "openvino", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["fmnist.bin", "fmnist.xml"]
    assert "top-1 agreement 1.0000" in res.output
    assert load(out).info["backend"] == "openvino"
