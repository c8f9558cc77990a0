from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgesmith.errors import UnsupportedOpError
from edgesmith.export.onnx import export
from edgesmith.runtime import load


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).relu().mean((2, 3)))


def test_single_file_with_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _Net().eval()
    path = export(net, (torch.randn(1, 3, 16, 16),), tmp_path / "net.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "net.onnx"
    ]  # weights inline, no .onnx.data, no temp
    model = load(path)
    assert model.inputs[0].shape[0] == "batch" and model.inputs[0].shape[1:] == (3, 16, 16)
    for batch in (1, 7):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            expected = net(x).numpy()
        np.testing.assert_allclose(model(x.numpy()), expected, atol=1e-5)


class _Hist(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.histc(x, bins=4)


def test_unsupported_op_is_diagnosed_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedOpError) as e:
        export(_Hist().eval(), (torch.randn(2, 8),), tmp_path / "h.onnx")
    assert e.value.op.startswith("aten.histc") and e.value.format == "onnx"
    assert "onnx cannot express operator 'aten.histc" in e.value.message
    assert "openvino or tflite" in (e.value.hint or "")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
