"""onnxruntime backend: execution providers tried in a stated order, CPU last."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgesmith.errors import EdgesmithError, ModelLoadError
from edgesmith.runtime.specs import TensorSpec

__all__ = ["PROVIDER_ORDER", "OrtSession", "open_session"]

log = logging.getLogger(__name__)

# Preferred first. "auto" takes the first of these the installed onnxruntime offers, falling back
# down the list (and always to CPU) when a provider fails to initialise.
PROVIDER_ORDER = [
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "QNNExecutionProvider",
    "CoreMLExecutionProvider",
    "XnnpackExecutionProvider",
    "CPUExecutionProvider",
]
_DEVICE_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "gpu": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape)
    return TensorSpec(arg.name, shape, _ORT_TYPES.get(arg.type, arg.type))


class OrtSession:
    """A thin wrapper over ``onnxruntime.InferenceSession``."""

    def __init__(self, sess: ort.InferenceSession, threads: int | None) -> None:
        self._sess = sess
        self.inputs = [_spec(a) for a in sess.get_inputs()]
        self.outputs = [_spec(a) for a in sess.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        self.info: dict[str, Any] = {
            "backend": "onnxruntime",
            "version": ort.__version__,
            "provider": sess.get_providers()[0],
            "providers": sess.get_providers(),
            "threads": threads,
        }

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._sess.run(self._output_names, feeds)


def _providers_for(device: str) -> list[str]:
    available = set(ort.get_available_providers())
    if device == "auto":
        wanted = PROVIDER_ORDER
    elif device in _DEVICE_PROVIDERS:
        wanted = _DEVICE_PROVIDERS[device]
    elif device.endswith("ExecutionProvider"):
        wanted = [device, "CPUExecutionProvider"]
    else:
        raise EdgesmithError(
            f"onnxruntime does not know device '{device}'",
            hint="use auto, cpu, cuda, tensorrt or an execution provider name",
        )
    chosen = [p for p in wanted if p in available]
    if device != "auto" and wanted[0] not in available:
        log.warning(
            "%s is not available in this onnxruntime build (%s); falling back to %s",
            wanted[0],
            ", ".join(sorted(available)),
            chosen[0] if chosen else "CPUExecutionProvider",
        )
    return chosen or ["CPUExecutionProvider"]


def open_session(
    path: Path,
    device: str = "auto",
    threads: int | None = None,
    options: dict[str, Any] | None = None,
) -> OrtSession:
    """Open an ONNX model file on the best available execution provider for ``device``."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    for key, value in (options or {}).get("session_config", {}).items():
        so.add_session_config_entry(str(key), str(value))
    providers = _providers_for(device)
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"onnxruntime cannot load {path.name}: {msg}",
            hint="is the file complete and a valid ONNX model? re-export it",
        ) from None
    if sess.get_providers()[0] != providers[0]:
        log.warning(
            "execution provider %s failed to initialise; running on %s",
            providers[0],
            sess.get_providers()[0],
        )
    log.info("onnxruntime %s on %s", path.name, sess.get_providers()[0])
    return OrtSession(sess, threads)
