"""OpenVINO backend: CPU, GPU, NPU or AUTO devices; f32 inference precision unless asked otherwise.

OpenVINO runs f32 models in bf16 by default on CPUs with AVX-512 BF16 or AMX (DESIGN.md section 7);
this backend pins ``INFERENCE_PRECISION_HINT=f32`` so results match the other backends, and takes
``options["precision"]`` (``bf16``, ``f16``) when speed matters more than the last digits.
``info["precision"]`` reports what the compiled model's compute layers actually run.

An int8 model (NNCF's FakeQuantize graph) whose int8 layers the plugin runs with float kernels (the
CPU plugin on 64-bit Arm runs int8 convolutions in fp32) is refused with a clear error: it would not
reproduce its int8 outputs, and its bundle would only fail its golden check later.
``options["allow_float_fallback"]`` runs it anyway and says so in ``info["float_fallback"]``.
"""

from __future__ import annotations

import logging
import platform
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from edgesmith.errors import EdgesmithError, ModelLoadError
from edgesmith.runtime.specs import TensorSpec

__all__ = ["OpenVinoSession", "open_session"]

log = logging.getLogger(__name__)

_DEVICES = {"auto": "AUTO", "cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
_PRECISIONS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "f32": "f32", "f16": "f16"}
_SHORT = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "i8": "int8", "u8": "int8"}
_COMPUTE = {"Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution"}
# IR compute ops, and the ops between an int8 weight constant and its layer (dequantization)
_IR_COMPUTE = {"Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData"}
_DEQUANT = {"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze", "Squeeze"}
_INT_TYPES = {"i8", "u8", "i4", "u4"}
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


def _runtime_precision(compiled: Any, hint: str) -> str:
    """The precision most compute layers of the compiled model run in (CPU plugin), else the hint."""
    try:
        counts: Counter[str] = Counter()
        for op in compiled.get_runtime_model().get_ops():
            rt = op.get_rt_info()
            if "layerType" in rt and rt["layerType"].astype(str) in _COMPUTE:
                counts[rt["runtimePrecision"].astype(str)] += 1
        if counts:
            return _SHORT.get(counts.most_common(1)[0][0], counts.most_common(1)[0][0])
    except (RuntimeError, KeyError, AttributeError):
        pass
    return _SHORT.get(hint, hint)


def _ir_precision(model: Any) -> str | None:
    """The inference precision an IR asks for in its runtime options (fp16/bf16 exports), if any."""
    key = ["runtime_options", "INFERENCE_PRECISION_HINT"]
    try:
        return str(model.get_rt_info(key).astype(str)) if model.has_rt_info(key) else None
    except (RuntimeError, AttributeError):
        return None


def _weights_precision(model: Any) -> str:
    """The element type holding most constant bytes (the weights) of the model."""
    sizes: Counter[str] = Counter()
    for op in model.get_ops():
        if op.get_type_name() == "Constant":
            sizes[op.get_element_type().get_type_name()] += int(op.get_byte_size())
    if not sizes:
        return "unknown"
    top = sizes.most_common(1)[0][0]
    return _SHORT.get(top, top)


def _int8_weights(op: Any, depth: int = 6) -> bool:
    """Whether a compute op's weights (input 1) come from an integer constant through dequantization."""
    nodes = [op.input_value(1).get_node()] if op.get_input_size() > 1 else []
    for _ in range(depth):
        following = []
        for node in nodes:
            kind = node.get_type_name()
            if kind == "Constant" and node.get_element_type().get_type_name() in _INT_TYPES:
                return True
            if kind in _DEQUANT:
                following += [v.get_node() for v in node.input_values()]
        nodes = following
    return False


def _quantized_layers(model: Any) -> int:
    """Compute layers of an int8 (FakeQuantize) IR that have int8 weights; 0 for other models.

    Weight-only compressed models (``w8``: int8 weights, no FakeQuantize) are meant to compute in
    float and count 0.
    """
    ops = list(model.get_ops())
    if not any(op.get_type_name() == "FakeQuantize" for op in ops):
        return 0
    return sum(op.get_type_name() in _IR_COMPUTE and _int8_weights(op) for op in ops)


def _float_fallback(compiled: Any, quantized: int) -> str | None:
    """Why the compiled model does not run its int8 layers in int8 (None when it does)."""
    if not quantized:
        return None
    int8 = 0
    floats: Counter[str] = Counter()
    try:
        for op in compiled.get_runtime_model().get_ops():
            rt = op.get_rt_info()
            if "layerType" not in rt or rt["layerType"].astype(str) not in _COMPUTE:
                continue
            precision = rt["runtimePrecision"].astype(str)
            if precision in _INT_TYPES:
                int8 += 1
            else:
                floats[f"{rt['layerType'].astype(str)} {_SHORT.get(precision, precision)}"] += 1
    except (RuntimeError, KeyError, AttributeError):
        return None  # a plugin without runtime info (NPU, GPU): nothing to say
    if int8 >= quantized:
        return None
    layers = ", ".join(f"{n}x {kind}" for kind, n in sorted(floats.items()))
    return f"{quantized - int8} of its {quantized} int8 layers run with float kernels ({layers})"


class OpenVinoSession:
    """A compiled OpenVINO model with one reusable infer request (calls are serialised)."""

    def __init__(
        self,
        compiled: Any,
        device: str,
        threads: int | None,
        hint: str,
        weights: str,
        fallback: str | None = None,
    ) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()
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
            "inference_precision": hint,
            "precision": _runtime_precision(compiled, hint),
            "weights": weights,
            "threads": threads,
        }
        if fallback:
            self.info["float_fallback"] = fallback

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            # outputs are copied out of the request's buffers, which the next call reuses
            results = self._request.infer(feeds, share_inputs=True, share_outputs=False)
            return [np.asarray(results[p]) for p in self._out_ports]


def _pick_device(device: str, available: list[str], fallback: str | None) -> str:
    ov_device = _DEVICES.get(device.lower(), device.upper())
    if ov_device == "AUTO":
        # OpenVINO's AUTO plugin drops per-device hints such as the inference precision, so pick
        # the device here: a GPU when present, else the CPU (NPUs need static shapes: ask for them).
        return "GPU" if any(d.startswith("GPU") for d in available) else "CPU"
    if any(d.startswith(ov_device.split(".")[0]) for d in available):
        return ov_device
    if fallback:
        log.warning(
            "OpenVINO device %s is not present (available: %s); falling back to %s",
            ov_device,
            ", ".join(available),
            fallback.upper(),
        )
        return fallback.upper()
    raise EdgesmithError(
        f"OpenVINO device '{ov_device}' is not present (available: {', '.join(available)})",
        hint="use device='auto' or 'cpu'",
    )


def open_session(
    path: Path,
    device: str = "auto",
    threads: int | None = None,
    options: dict[str, Any] | None = None,
) -> OpenVinoSession:
    """Compile an OpenVINO IR (``.xml`` + ``.bin``) or ONNX file on ``device``.

    Options: ``precision`` (inference precision hint: ``f32`` default, exact; ``bf16`` or ``f16``
    trade accuracy for speed), ``performance_hint`` (``LATENCY`` default, or ``THROUGHPUT``),
    ``fallback_device`` (used when ``device`` is absent, instead of an error),
    ``allow_float_fallback`` (run an int8 model whose int8 layers the device runs in float instead
    of refusing it).

    Raises:
        ModelLoadError: an unreadable model, or an int8 model this device would run in float.
    """
    options = options or {}
    core = _get_core()
    ov_device = _pick_device(device, list(core.available_devices), options.get("fallback_device"))
    if path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
        raise ModelLoadError(
            f"{path.name} has no weights file {path.with_suffix('.bin').name}",
            hint="copy the .bin next to the .xml",
        )
    try:
        model = core.read_model(str(path))
        # an fp16/bf16 export asks for its precision in the IR; options override, f32 otherwise
        precision = str(options.get("precision") or _ir_precision(model) or "f32")
        hint = _PRECISIONS.get(precision.lower())
        if hint is None:
            raise EdgesmithError(
                f"unknown OpenVINO precision '{precision}'", hint="use f32, f16 or bf16"
            )
        config: dict[str, Any] = (
            {"INFERENCE_PRECISION_HINT": hint} if ov_device in ("CPU", "GPU") else {}
        )
        if threads and ov_device == "CPU":
            config["INFERENCE_NUM_THREADS"] = int(threads)
        config["PERFORMANCE_HINT"] = str(options.get("performance_hint", "LATENCY"))
        compiled = core.compile_model(model, ov_device, config)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "unknown error")
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines[1:] if not ln.startswith("Check ")), first)
        raise ModelLoadError(
            f"OpenVINO cannot load {path.name}: {detail[:300]}",
            hint="is the file complete and a valid model? re-export it",
        ) from None
    fallback = _float_fallback(compiled, _quantized_layers(model))
    if fallback and not options.get("allow_float_fallback"):
        raise ModelLoadError(
            f"{path.name} is an int8 model, but OpenVINO's {ov_device} plugin on this "
            f"{platform.machine()} machine would run it in {_runtime_precision(compiled, hint)}: "
            f"{fallback}; it would not reproduce its int8 outputs",
            hint="run an int8 ONNX or TFLite bundle built for this device (edgesmith build RECIPE "
            "--target rpi5), or the fp32 OpenVINO model; options={'allow_float_fallback': True} "
            "runs it anyway",
        )
    if fallback:
        log.warning("%s: %s", path.name, fallback)
    log.info("openvino %s on %s", path.name, ov_device)
    return OpenVinoSession(compiled, ov_device, threads, hint, _weights_precision(model), fallback)
