"""Learned rounding (compress/quantize/rounding.py): each weight rounded up or down to the grid every
int8 tool keeps, whichever keeps the layer's output closest to float."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgesmith.compress.quantize.ptq import _round_weights, apply
from edgesmith.compress.quantize.rounding import learned_round
from tests.compress.conftest import trained


class SamePadding(nn.Conv2d):
    """EfficientNet-PyTorch's TensorFlow-style "same" convolution: its own padding module."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            self.static_padding(x),
            self.weight,
            self.bias,
            self.stride,
            0,
            self.dilation,
            self.groups,
        )


class Scaled(nn.Conv2d):
    """A convolution whose forward does more than convolve: learned rounding cannot model it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(2 * x)


LAYERS = {
    "conv": (lambda: nn.Conv2d(8, 16, 3, padding=1), (16, 8, 12, 12)),
    "depthwise-strided": (lambda: nn.Conv2d(16, 16, 3, 2, 1, groups=16), (16, 16, 12, 12)),
    "grouped-dilated": (
        lambda: nn.Conv2d(8, 16, (3, 5), (2, 1), (1, 2), dilation=(1, 2), groups=2),
        (4, 8, 13, 17),
    ),
    "same-padding": (lambda: SamePadding(8, 8, 3, stride=2), (8, 8, 12, 12)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3), (8, 4, 20)),
    "linear-on-sequences": (lambda: nn.Linear(32, 10), (20, 6, 32)),
}


def _centred_error(mod: nn.Module, w: torch.Tensor, xq: torch.Tensor, x: torch.Tensor) -> float:
    """Output error of ``mod`` with weights ``w`` on ``xq`` against float on ``x``, its per-channel
    mean removed (what the bias correction after the rounding takes out)."""
    saved = mod.weight.data
    with torch.no_grad():
        mod.weight.data = w
        e = mod(xq)
        mod.weight.data = saved
        e = e - mod(x)
    channel = e.dim() - 1 if isinstance(mod, nn.Linear) else 1
    e = e - e.mean([d for d in range(e.dim()) if d != channel], keepdim=True)
    return float((e.double() ** 2).mean())


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_every_layer_form_keeps_the_grid_and_lowers_its_error(kind: str) -> None:
    """For each convolution form the patches reproduce the layer (else it would fall back), the
    weights stay on the per-channel grid with each channel's largest weight in place (so the tools'
    ``absmax / 127`` scale is the same), and the error the bias correction cannot remove is lower
    than with nearest rounding."""
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    mod = make()
    x = torch.randn(shape)
    x = x + 0.7 * x.roll(1, 1)  # correlated inputs, as in a real network
    xq = x + 0.02 * torch.randn_like(x)  # the quantized model's input
    w = mod.weight.data.clone()
    q = learned_round(mod, w, xq, x)
    assert q is not None
    scale = w.abs().flatten(1).amax(1) / 127
    grid = q.flatten(1) / scale[:, None]
    assert torch.allclose(grid, grid.round(), atol=1e-3) and grid.abs().max() <= 127 + 1e-3
    assert torch.equal(q.abs().flatten(1).amax(1), w.abs().flatten(1).amax(1))
    nearest = _round_weights(w, per_channel=True)
    assert not torch.equal(q, nearest)
    assert _centred_error(mod, q, xq, x) < _centred_error(mod, nearest, xq, x)
    assert torch.equal(mod.weight.data, w)  # the module itself is left alone


def test_a_layer_whose_forward_it_cannot_model_falls_back_to_nearest() -> None:
    torch.manual_seed(0)
    mod = Scaled(4, 4, 3, padding=1)
    x = torch.randn(4, 4, 8, 8)
    assert learned_round(mod, mod.weight.data, x, x) is None
    model = nn.Sequential(mod, nn.ReLU()).eval()
    res = apply(model, x.numpy(), samples=4, rounding="learned")
    w = mod.weight.data
    assert torch.equal(res.model.get_submodule("0").weight.data, _round_weights(w, True))


def _inputs(dataset: Any, n: int, start: int = 0) -> np.ndarray:
    return np.stack([dataset[i][0].numpy() for i in range(start, start + n)])


def test_learned_rounding_brings_the_int8_model_closer_to_float_on_held_out_images(
    fmnist: Any,
) -> None:
    """On the reference CNN and real Fashion-MNIST: calibrated on 64 images, judged on 500 others
    (the simulated int8 model: int8 weights, quantized layer inputs)."""
    model = trained("SmallCNN")
    calib = _inputs(fmnist.calibration, 64)
    nearest = apply(model, calib, samples=64, rounding="nearest")
    learned = apply(model, calib, samples=64, rounding="learned")
    assert learned.to_json()["rounding"] == "learned"
    x = _inputs(fmnist.eval, 500)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy().astype(np.float64)

    def noise(out: np.ndarray) -> float:
        return float(((out - ref) ** 2).sum() / (ref**2).sum())

    assert noise(learned.simulate(x)) < 0.9 * noise(nearest.simulate(x))


def test_onnxruntime_keeps_the_learned_weights(fmnist: Any, tmp_path: Any) -> None:
    """onnxruntime's own per-channel weight quantization reproduces the learned weights exactly
    (the same grid), so the rounding survives the format's tool."""
    import onnx
    from onnx import numpy_helper

    from edgesmith.compress.quantize.config import Scheme
    from edgesmith.compress.quantize.onnx import OnnxQuantizer
    from edgesmith.export.onnx import export

    model = trained("SmallCNN")
    res = apply(model, _inputs(fmnist.calibration, 64), samples=64, rounding="learned")
    src = export(res.model.eval(), (torch.zeros(1, 1, 28, 28),), tmp_path / "learned.onnx")
    q = OnnxQuantizer(src, _inputs(fmnist.calibration, 32), Scheme(), tmp_path / "q")
    qmodel = onnx.load(str(q.quantize(tmp_path / "int8.onnx", [])[0]))
    inits = {i.name: numpy_helper.to_array(i) for i in qmodel.graph.initializer}
    for name in ("features.0", "features.3"):
        w = res.model.get_submodule(name).weight.detach().numpy()
        int8 = inits[f"{name}.weight_quantized"].astype(np.float32)
        scale = inits[f"{name}.weight_scale"].reshape(-1, 1, 1, 1)
        assert np.allclose(int8 * scale, w, atol=1e-6)
    nearest = _round_weights(res.original.get_submodule("features.3").weight.data, True)
    assert not torch.equal(res.model.get_submodule("features.3").weight.data, nearest)
