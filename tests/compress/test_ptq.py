"""Post-training quantization in PyTorch before export (compress/quantize/ptq.py), on the real
reference CNN and real Fashion-MNIST images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from edgesmith.compress.quantize.ptq import PtqSkipped, apply, fold_batch_norms, trace
from tests.compress.conftest import trained


def _inputs(dataset: Any, n: int) -> np.ndarray:
    return np.stack([dataset[i][0].numpy() for i in range(n)])


@pytest.fixture(scope="module")
def corrected(fmnist: Any) -> Any:
    model = trained("SmallCNN")
    return model, apply(model, _inputs(fmnist.calibration, 64), samples=64)


def _noise(out: Any, ref: Any) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(((out - ref) ** 2).sum() / (ref**2).sum())


def test_folding_batch_norms_keeps_the_function(fmnist: Any) -> None:
    model = trained("SmallCNN")
    gm = trace(model)
    assert fold_batch_norms(gm) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    x = torch.from_numpy(_inputs(fmnist.eval, 64))
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-4)


def test_weights_sit_on_the_int8_grid_every_tool_uses(corrected: Any) -> None:
    _, res = corrected
    convs = [m for m in res.model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(convs) == len(res.layers) == 6
    for m in convs:
        w = m.weight.detach().flatten(1)
        scale = w.abs().amax(1, keepdim=True) / 127  # per output channel, symmetric
        q = w / scale
        assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 127 + 1e-3


def test_bias_correction_lowers_the_int8_error(corrected: Any, fmnist: Any) -> None:
    """Corrected biases bring the simulated int8 model closer to float than rounding alone."""
    model, res = corrected
    x = _inputs(fmnist.eval, 500)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    rounded = trace(model)
    fold_batch_norms(rounded)
    with torch.no_grad():
        for m in rounded.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                s = m.weight.abs().flatten(1).amax(1).view(-1, *[1] * (m.weight.dim() - 1)) / 127
                m.weight.copy_(torch.round(m.weight / s) * s)
        plain = rounded(torch.from_numpy(x)).numpy()
        fixed = res.model(torch.from_numpy(x)).numpy()
    assert _noise(fixed, ref) < 0.8 * _noise(plain, ref)
    assert all(s.error <= s.error_rounded + 1e-9 for s in res.layers)
    # the simulation (quantized layer inputs too) stays close to float; all float is exact
    assert (res.simulate(x).argmax(1) == ref.argmax(1)).mean() >= 0.97
    exact = res.simulate(x, float_layers=[s.name for s in res.layers])
    assert np.allclose(exact, ref, atol=1e-4)


def test_onnxruntime_keeps_the_corrected_weights(corrected: Any, tmp_path: Path) -> None:
    """onnxruntime's own per-channel weight quantization leaves the rounded weights unchanged, and a
    node kept float gets the original (uncorrected) weights and bias back."""
    import onnx
    from onnx import numpy_helper

    from edgesmith.compress.quantize.config import Scheme
    from edgesmith.compress.quantize.onnx import OnnxQuantizer
    from edgesmith.export.onnx import export

    _, res = corrected
    example = torch.zeros(1, 1, 28, 28)
    src = export(res.model.eval(), (example,), tmp_path / "corrected.onnx")
    orig = export(res.original.eval(), (example,), tmp_path / "original.onnx")
    calib = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)  # ranges only
    q = OnnxQuantizer(src, calib, Scheme(), tmp_path / "q", original=lambda: orig)
    qmodel = onnx.load(str(q.quantize(tmp_path / "int8.onnx", [])[0]))
    inits = {i.name: numpy_helper.to_array(i) for i in qmodel.graph.initializer}
    w = res.model.get_submodule("features.3").weight.detach().numpy()
    int8 = inits["features.3.weight_quantized"].astype(np.float32)
    scale = inits["features.3.weight_scale"].reshape(-1, 1, 1, 1)
    assert np.allclose(int8 * scale, w, atol=1e-6)

    first = q.layers[0]  # features.0, kept float: its own float weights and bias come back
    kept = onnx.load(str(q.quantize(tmp_path / "kept.onnx", [first.id])[0]))
    inits = {i.name: numpy_helper.to_array(i) for i in kept.graph.initializer}
    original = res.original.get_submodule("features.0")
    assert np.array_equal(inits["features.0.weight"], original.weight.detach().numpy())
    assert np.array_equal(inits["features.0.bias"], original.bias.detach().numpy())
    assert not np.array_equal(
        inits["features.0.bias"], res.model.get_submodule("features.0").bias.detach().numpy()
    )


def test_dead_channel_gets_a_weight_its_int32_bias_fits() -> None:
    """A channel with zero weights and a large bias: ai-edge-quantizer's int32 bias would overflow."""
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[2].zero_()
        conv.bias[2] = 7.0
    model = nn.Sequential(conv, nn.ReLU())
    x = np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32)
    res = apply(model, x, samples=16)
    assert res.layers[0].guarded == 1
    w = res.model.get_submodule("0").weight.detach()
    lo, hi = res.ranges[next(iter(res.ranges))]
    in_scale = (max(hi, 0) - min(lo, 0)) / 255
    w_scale = w[2].abs().max() / 127
    assert 7.0 / (in_scale * w_scale) < 2**31  # the int32 bias fits
    with torch.no_grad():
        assert torch.allclose(res.model(torch.from_numpy(x)), model(torch.from_numpy(x)), atol=0.05)


def test_a_model_torch_fx_cannot_trace_is_skipped() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(PtqSkipped, match="torch.fx cannot trace"):
        apply(Branchy(), np.ones((4, 4), np.float32))
