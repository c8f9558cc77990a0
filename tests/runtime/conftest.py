"""Shared fixtures for the runtime and server tests: the reference model in every format, built once.

``models`` exports the reference SmallCNN (examples/fashion_mnist, trained weights) to ONNX, OpenVINO
IR and TFLite, writes a bundle of it (version 1) and a second bundle (version 2, whose last-layer
bias is shifted by +1 so its answers are told apart), and a wider SmallCNN with seeded random
weights that is slow enough (several ms per sample) to overload a server from one HTTP client.
``serve`` starts ``edgesmith serve`` as a real subprocess and stops it with SIGTERM.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _serving import ServerProcess

from edgesmith.data import FASHION_MNIST_LABELS

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "fashion_mnist" / "recipe-fp32.yaml"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
PREPROCESS = {
    "channels": "GRAY",
    "layout": "NCHW",
    "mean": [0.286],
    "std": [0.353],
    "resize": [28, 28],
    "scale": 1.0 / 255.0,
}
LABELS = FASHION_MNIST_LABELS


@dataclass
class Models:
    onnx: Path
    xml: Path
    tflite: Path
    bundle: Path  # version 1
    bundle_v2: Path  # version 2: logits + 1
    wide_onnx: Path  # random-weight SmallCNN(width=192), for load tests
    images: np.ndarray  # (N, 28, 28) uint8 Fashion-MNIST test images
    labels: np.ndarray
    inputs: np.ndarray  # (N, 1, 28, 28) float32, preprocessed


def _bundle(
    root: Path, onnx_path: Path, version: int, inputs: np.ndarray, expected: np.ndarray
) -> Path:
    from edgesmith.runtime.bundle import write_bundle

    work = root / f"work-v{version}"
    work.mkdir()
    golden = work / "golden.npz"
    np.savez(golden, inputs=inputs, outputs=expected)
    out = root / f"fmnist-cnn-v{version}"
    write_bundle(
        out,
        {
            "name": "fmnist-cnn",
            "version": version,
            "target": "x86-cpu",
            "format": "onnx",
            "precision": "fp32",
            "model": "model.onnx",
            "inputs": [{"name": "input", "shape": ["batch", 1, 28, 28], "dtype": "float32"}],
            "outputs": [{"name": "output", "shape": ["batch", 10], "dtype": "float32"}],
            "preprocess": PREPROCESS,
            "labels": LABELS,
            "golden": {"file": "golden.npz", "atol": 1e-4, "rtol": 1e-3, "top1": True},
        },
        {"model.onnx": onnx_path, "golden.npz": golden},
    )
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    torch = pytest.importorskip("torch")
    import openvino as ov

    from edgesmith.data import read_fashion_mnist
    from edgesmith.export.onnx import export
    from edgesmith.models import build_model
    from edgesmith.recipe import load_recipe
    from edgesmith.runtime.specs import TensorSpec, preprocess_images

    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("models")
    images, labels = read_fashion_mnist(FMNIST, "test")
    images, labels = images[:1000], labels[:1000]
    inputs = preprocess_images(
        images, PREPROCESS, TensorSpec("input", ("batch", 1, 28, 28), "float32")
    )

    model = build_model(load_recipe(RECIPE).model).eval()
    example = torch.zeros(1, 1, 28, 28)
    onnx_path = export(model, (example,), root / "ref.onnx")
    ov.save_model(ov.convert_model(str(onnx_path)), str(root / "ref.xml"), compress_to_fp16=False)

    import litert_torch

    litert_torch.convert(model, (example,)).export(str(root / "ref.tflite"))

    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted.classifier[-1].bias += 1.0
    onnx_v2 = export(shifted, (example,), root / "ref-v2.onnx")

    torch.manual_seed(0)
    sys.path.insert(0, str(RECIPE.parent))
    try:
        from model import SmallCNN  # examples/fashion_mnist/model.py
    finally:
        sys.path.remove(str(RECIPE.parent))
    wide = export(SmallCNN(width=192).eval(), (example,), root / "wide.onnx")

    import onnxruntime as ort

    golden_in = inputs[:8]
    ref_out = ort.InferenceSession(str(onnx_path)).run(None, {"input": golden_in})[0]
    v2_out = ort.InferenceSession(str(onnx_v2)).run(None, {"input": golden_in})[0]
    return Models(
        onnx=onnx_path,
        xml=root / "ref.xml",
        tflite=root / "ref.tflite",
        bundle=_bundle(root, onnx_path, 1, golden_in, ref_out),
        bundle_v2=_bundle(root, onnx_v2, 2, golden_in, v2_out),
        wide_onnx=wide,
        images=images,
        labels=labels,
        inputs=inputs,
    )


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers for one test; each is stopped (SIGTERM) at the end of the test."""
    started: list[ServerProcess] = []

    def start(*args: Any, env: dict[str, str] | None = None) -> ServerProcess:
        s = ServerProcess([str(a) for a in args], tmp_path, env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
