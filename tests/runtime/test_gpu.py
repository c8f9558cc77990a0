"""CUDA and TensorRT execution providers against the CPU, on a machine with an NVIDIA GPU.

Self-contained (no ``models`` fixture): it exports the reference SmallCNN with its trained weights and
compares each GPU provider with the CPU on Fashion-MNIST test images (seeded random inputs where the
data set is absent). Skipped where onnxruntime has no CUDA provider; ``benchmarks/gpu_providers.py``
is the timing counterpart. Run with ``pytest -m gpu tests/runtime/test_gpu.py``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
FMNIST = Path(os.environ.get("EDGESMITH_FMNIST", "/usr/share/datasets/fashion-mnist"))

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        importlib.util.find_spec("onnxruntime") is None
        or "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
        reason="needs onnxruntime with the CUDA execution provider (onnxruntime-gpu) and a GPU",
    ),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    import torch

    sys.path.insert(0, str(ROOT / "examples" / "fashion_mnist"))
    try:
        from model import SmallCNN
    finally:
        sys.path.pop(0)
    from safetensors.torch import load_file

    from edgesmith.export.onnx import export

    net = SmallCNN().eval()
    net.load_state_dict(load_file(str(ROOT / "examples" / "fashion_mnist" / "weights.safetensors")))
    path = export(net, (torch.zeros(1, 1, 28, 28),), tmp_path_factory.mktemp("gpu") / "m.onnx")
    if (FMNIST / "t10k-images-idx3-ubyte.gz").is_file():
        from edgesmith.data import read_fashion_mnist

        images, _ = read_fashion_mnist(FMNIST, "test")
        x = ((images[:1000].astype(np.float32) / 255.0 - 0.286) / 0.353)[:, None]
    else:
        x = np.random.default_rng(0).standard_normal((1000, 1, 28, 28)).astype(np.float32)
    return path, x


def _run(path: Path, x: np.ndarray, device: str, options: dict | None = None):
    from edgesmith.runtime import load

    model = load(path, device=device, options=options)
    return model, np.concatenate([model(x[i : i + 250]) for i in range(0, len(x), 250)])


# TF32 (onnxruntime's default on Ampere and newer; edgesmith turns it off unless precision "tf32")
# keeps 10 mantissa bits: logits of magnitude ~10 moved by ~2e-3 (SmallCNN) on an H200. In fp32 the GPU
# agrees with the CPU to ~1e-5. Every configuration must give the same classes.
@pytest.mark.parametrize(
    ("device", "options", "want", "atol"),
    [
        ("cuda", None, "CUDAExecutionProvider", 1e-3),
        ("cuda", {"precision": "tf32"}, "CUDAExecutionProvider", 5e-2),
        ("tensorrt", None, "TensorrtExecutionProvider", 1e-3),
        ("tensorrt", {"precision": "fp16"}, "TensorrtExecutionProvider", 2e-1),
    ],
    ids=["cuda", "cuda-tf32", "tensorrt", "tensorrt-fp16"],
)
def test_gpu_provider_matches_cpu(reference, device, options, want, atol) -> None:
    path, x = reference
    _, cpu = _run(path, x, "cpu")
    model, out = _run(path, x, device, options)
    if model.info["provider"] != want:
        if want == "TensorrtExecutionProvider":
            pytest.skip(f"TensorRT libraries not installed: ran on {model.info['provider']}")
        pytest.fail(f"asked for {want}, ran on {model.info['provider']}")
    assert (out.argmax(1) == cpu.argmax(1)).mean() >= 0.999
    assert np.abs(out - cpu).max() < atol
