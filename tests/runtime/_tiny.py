"""A tiny real ONNX model (built with the onnx package, run by onnxruntime) and bundles of it, for
the security and fuzz tests: fast to make, no torch.

The model takes ``input`` [batch, 1, 8, 8] float32 and returns ``output`` [batch, 3] =
flatten(input) @ W + b; W may live in an external data file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

W = (np.arange(64 * 3, dtype=np.float32).reshape(64, 3) % 7 - 3) / 10
B = np.array([0.5, -0.25, 0.125], dtype=np.float32)
PREPROCESS = {
    "channels": "GRAY",
    "layout": "NCHW",
    "mean": [0.5],
    "std": [0.25],
    "resize": [8, 8],
    "scale": 1.0 / 255.0,
}


def expected(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1) @ W + B


def tiny_onnx(
    path: Path, external: str | None = None, batch: str | int = "batch", raw_location: bool = False
) -> Path:
    """Write the model to ``path``; with ``external``, W goes to that file (relative to the model's
    folder) unless ``raw_location``, which only names it (for hostile locations)."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(W, "W")
    if external is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for k, v in (("location", external), ("offset", "0"), ("length", str(W.nbytes))):
            e = w.external_data.add()
            e.key, e.value = k, v
        if not raw_location:
            target = path.parent / external
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(W.tobytes())
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["output"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 3])],
        [w, numpy_helper.from_array(B, "b")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(m.SerializeToString())
    return path


def manifest(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "tiny",
        "version": 1,
        "target": "x86-cpu",
        "format": "onnx",
        "precision": "fp32",
        "model": "model.onnx",
        "inputs": [{"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}],
        "outputs": [{"name": "output", "shape": ["batch", 3], "dtype": "float32"}],
        "preprocess": PREPROCESS,
        "labels": ["a", "b", "c"],
    }
    doc.update(extra)
    return doc


def tiny_bundle(
    out: Path, work: Path, *, external: str | None = None, golden: bool = True, **kw: Any
) -> Path:
    """A bundle of the tiny model (unsigned unless ``sign_key`` is given)."""
    from edgesmith.runtime.bundle import write_bundle

    work.mkdir(parents=True, exist_ok=True)
    model = tiny_onnx(work / "model.onnx", external)
    files = {"model.onnx": model}
    if external:
        files[external] = work / external
    doc = manifest()
    if golden:
        x = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 1, 8, 8)
        np.savez(work / "golden.npz", inputs=x, outputs=expected(x))
        files["golden.npz"] = work / "golden.npz"
        doc["golden"] = {"file": "golden.npz", "atol": 1e-4, "rtol": 1e-3, "top1": True}
    write_bundle(out, doc, files, **kw)
    return out
