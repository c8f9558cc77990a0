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
    ``absmax / 127`` scale gives the same integers), and the error the bias correction cannot remove is lower
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
    assert torch.allclose(grid, grid.round(), atol=1e-4) and grid.abs().max() <= 127 + 1e-4
    # each channel's largest weight stays (to the float rounding of 127 * absmax / 127), so a tool
    # recomputing the scale from the rounded weights lands on the same integers
    assert torch.allclose(q.abs().flatten(1).amax(1), w.abs().flatten(1).amax(1), rtol=1e-6)
    theirs = q.flatten(1) / (q.abs().flatten(1).amax(1, keepdim=True) / 127)
    assert torch.equal(theirs.round(), grid.round())
    nearest = _round_weights(w, per_channel=True)
    assert not torch.equal(q, nearest)
    assert _centred_error(mod, q, xq, x) < _centred_error(mod, nearest, xq, x)
    assert torch.equal(mod.weight.data, w)  # the module itself is left alone


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        lambda: nn.Conv2d(4, 4, 3, padding="same"),
        lambda: nn.Conv3d(4, 4, 3, padding=1),
    ],
    ids=["reflect-padding", "string-padding", "conv3d"],
)
def test_layers_it_does_not_read_keep_nearest_rounding(make: Any) -> None:
    torch.manual_seed(0)
    mod = make()
    x = torch.randn(4, 4, 6, 6, 6) if isinstance(mod, nn.Conv3d) else torch.randn(4, 4, 8, 8)
    assert learned_round(mod, mod.weight.data, x, x) is None


def test_greedy_flips_against_exhaustive_search_on_tiny_filters() -> None:
    """On 20 six-weight filters with correlated inputs (all 64 up/down choices enumerated): the
    flips never do worse than nearest rounding and mostly reach the best choice, which nearest
    rounding mostly misses (a greedy search can stop in a local optimum: the bar is not 20)."""
    optimal = nearest_optimal = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        k = 6
        x = torch.randn(400, k, generator=g) @ (torch.eye(k) + 0.9 * torch.randn(k, k, generator=g))
        w = torch.randn(1, k, generator=g)
        q = learned_round(nn.Linear(k, 1, bias=False), w, x, x)
        assert q is not None
        xc = x - x.mean(0)

        def err(v: torch.Tensor, xc: torch.Tensor = xc, w: torch.Tensor = w) -> float:
            return float(((xc @ (v - w).T) ** 2).mean())

        scale = w.abs().max() / 127
        lo, hi = torch.floor(w / scale), torch.ceil(w / scale)
        best = min(
            err(torch.where(torch.tensor([[bool(b >> i & 1) for i in range(k)]]), hi, lo) * scale)
            for b in range(2**k)
        )
        nearest = err(_round_weights(w, per_channel=True))
        assert err(q) <= nearest * (1 + 1e-5)
        optimal += err(q) <= best * (1 + 1e-5)
        nearest_optimal += nearest <= best * (1 + 1e-5)
    assert optimal >= 12 and nearest_optimal <= 10, (optimal, nearest_optimal)


def test_per_tensor_weights_and_unknown_roundings() -> None:
    """Learned rounding keeps per-channel grids: per-tensor weights are rounded to nearest and the
    record says so; a misspelt rounding is an error, not a silent nearest."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32)
    res = apply(model, x, samples=8, per_channel=False, rounding="learned")
    assert res.to_json()["rounding"] == "nearest"
    with pytest.raises(ValueError, match="rounding"):
        apply(model, x, samples=8, rounding="Learned")


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
