"""OpenVINO backend: CPU, GPU, NPU or AUTO devices; f32 inference precision unless asked otherwise."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from edgesmith.errors import EdgesmithError, ModelLoadError
from edgesmith.runtime.specs import TensorSpec

__all__ = ["OpenVinoSession", "open_session"]

log = logging.getLogger(__name__)

_DEVICES = {"auto": "AUTO", "cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
_core: ov.Core | None = None


def _get_core() -> ov.Core:
    global _core
    if _core is None:
        _core = ov.Core()
    return _core


def _spec(port: Any, symbolic: str = "batch") -> TensorSpec:
    shape = tuple(
        int(d.get_length()) if d.is_static else (symbolic if i == 0 else f"d{i}")
        for i, d in enumerate(port.get_partial_shape())
    )
    return TensorSpec(port.get_any_name(), shape, str(np.dtype(port.get_element_type().to_dtype())))


def _ir_precision(model: Any) -> str | None:
    """The inference precision an IR asks for in its runtime options (fp16/bf16 exports), if any."""
    key = ["runtime_options", "INFERENCE_PRECISION_HINT"]
    try:
        return str(model.get_rt_info(key).astype(str)) if model.has_rt_info(key) else None
    except (RuntimeError, AttributeError):
        return None


class OpenVinoSession:
    """A compiled OpenVINO model with one reusable infer request."""

    def __init__(self, compiled: Any, device: str, threads: int | None, precision: str) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self.inputs = [_spec(p) for p in compiled.inputs]
        self.outputs = [_spec(p) for p in compiled.outputs]
        self._out_ports = list(compiled.outputs)
        try:
            exec_devices = compiled.get_property("EXECUTION_DEVICES")
        except RuntimeError:
            exec_devices = [device]
        self.info: dict[str, Any] = {
            "backend": "openvino",
            "version": ov.__version__,
            "provider": ",".join(exec_devices),
            "device": device,
            "inference_precision": precision,
            "threads": threads,
        }

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self._request.infer(feeds)
        return [np.asarray(results[p]) for p in self._out_ports]


def open_session(
    path: Path,
    device: str = "auto",
    threads: int | None = None,
    options: dict[str, Any] | None = None,
) -> OpenVinoSession:
    """Compile an OpenVINO IR (``.xml`` + ``.bin``) or ONNX file on ``device``.

    ``options["precision"]`` sets the inference precision hint (default ``f32``: exact results; ``bf16``
    or ``f16`` trade accuracy for speed on CPUs and GPUs that have them).
    """
    options = options or {}
    core = _get_core()
    available = core.available_devices
    ov_device = _DEVICES.get(device.lower(), device.upper())
    if ov_device == "AUTO":
        # OpenVINO's AUTO plugin drops per-device hints such as the inference precision, so pick
        # the device here: a GPU when present, else the CPU (NPUs need static shapes: ask for them).
        ov_device = "GPU" if any(d.startswith("GPU") for d in available) else "CPU"
    if ov_device not in ("AUTO",) and not any(
        d.startswith(ov_device.split(".")[0]) for d in available
    ):
        raise EdgesmithError(
            f"OpenVINO device '{ov_device}' is not present (available: {', '.join(available)})",
            hint="use device='auto' or 'cpu'",
        )
    if path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
        raise ModelLoadError(
            f"{path.name} has no weights file {path.with_suffix('.bin').name}",
            hint="copy the .bin next to the .xml",
        )
    try:
        model = core.read_model(str(path))
        precision = str(options.get("precision") or _ir_precision(model) or "f32")
        config: dict[str, Any] = (
            {"INFERENCE_PRECISION_HINT": precision} if ov_device in ("CPU", "GPU") else {}
        )
        if threads and ov_device == "CPU":
            config["INFERENCE_NUM_THREADS"] = int(threads)
        config["PERFORMANCE_HINT"] = str(options.get("performance_hint", "LATENCY"))
        compiled = core.compile_model(model, ov_device, config)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "unknown error")
        raise ModelLoadError(
            f"OpenVINO cannot load {path.name}: {first[:300]}",
            hint="is the file complete and a valid model? re-export it",
        ) from None
    log.info("openvino %s on %s", path.name, ov_device)
    return OpenVinoSession(compiled, ov_device, threads, precision)
