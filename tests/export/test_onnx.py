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


@pytest.mark.parametrize(
    ("arch", "weights"),
    [("SmallCNN", "weights"), ("RowLSTM", "lstm"), ("PatchTransformer", "transformer")],
)
def test_reference_architectures_export_with_symbolic_batch_and_parity(
    arch: str, weights: str, tmp_path: Path
) -> None:
    from edgesmith.data import FASHION_MNIST_PREPROCESS, _as_model_input, read_fashion_mnist
    from edgesmith.models import build_model
    from edgesmith.recipe import ModelConfig
    from tests.conftest import FMNIST_DIR

    net = build_model(
        ModelConfig(
            factory=f"{FMNIST_DIR / 'model.py'}:{arch}",
            weights=str(FMNIST_DIR / f"{weights}.safetensors"),
            input={"shape": [1, 1, 28, 28]},
        )
    )
    images, labels = read_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")
    x = _as_model_input(images[:300], FASHION_MNIST_PREPROCESS, [1, 1, 28, 28], "float32")
    # a batch-1 example used to make torch.export specialise the batch of LSTMs to 1
    path = export(net, (torch.from_numpy(x[:1]),), tmp_path / f"{arch}.onnx")
    model = load(path)
    assert model.inputs[0].shape[0] == "batch"
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    got = model(x)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert (got.argmax(1) == labels[:300]).mean() > 0.8  # trained weights, real images


def test_mac_counts_include_recurrent_and_attention_layers() -> None:
    import sys

    from edgesmith.measure import count_macs
    from tests.conftest import FMNIST_DIR

    sys.path.insert(0, str(FMNIST_DIR))
    try:
        from model import PatchTransformer, RowLSTM
    finally:
        sys.path.remove(str(FMNIST_DIR))
    x = torch.randn(1, 1, 28, 28)
    assert count_macs(RowLSTM(), x) == 4 * 128 * (28 + 128) * 28 + 128 * 10
    # 2 blocks x (qkv 50x64x192 + scores/values 2x50x50x64 + out 50x64x64 + MLP 2x50x64x128) + patches + head
    blocks = 2 * (50 * 64 * 192 + 2 * 50 * 50 * 64 + 50 * 64 * 64 + 2 * 50 * 64 * 128)
    assert count_macs(PatchTransformer(), x) == blocks + 49 * 64 * 16 + 64 * 10
