"""onnxruntime backend: execution providers tried in a stated order, CPU last.

Fallback order for ``device="auto"`` (``PROVIDER_ORDER``): TensorRT, CUDA, OpenVINO, QNN, CoreML,
XNNPACK, CPU. Only providers the installed onnxruntime build offers are tried; when one fails to
initialise, the session is opened again without it, and the provider that finally runs is logged
and reported in ``info["provider"]``. A bundle whose target profile lists providers uses that order
instead.

``options["require_accelerator"]`` (a target name; set by ``load()`` for profiles with
``require_accelerator``, e.g. Jetson) makes ``open_session`` raise ModelLoadError instead of running
on the CPU when none of the accelerator providers in ``options["providers"]`` is in this build or
initialises.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgesmith.errors import EdgesmithError, ModelLoadError
from edgesmith.runtime.specs import TensorSpec

__all__ = ["PROVIDER_ORDER", "OrtSession", "open_session", "providers_for"]

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
PROVIDER_ORDER = [
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "QNNExecutionProvider",
    "CoreMLExecutionProvider",
    "XnnpackExecutionProvider",
    CPU,
]
_DEVICE_PROVIDERS = {
    "cpu": [CPU],
    "cuda": ["CUDAExecutionProvider", CPU],
    "gpu": ["CUDAExecutionProvider", "OpenVINOExecutionProvider", CPU],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU],
    "npu": ["QNNExecutionProvider", "OpenVINOExecutionProvider", CPU],
}
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(uint16)": "uint16",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}
# names written in profiles and by people (XNNPACKExecutionProvider) -> onnxruntime's spelling
_CANONICAL = {p.lower(): p for p in PROVIDER_ORDER}


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape)
    return TensorSpec(arg.name, shape, _ORT_TYPES.get(arg.type, arg.type))


class OrtSession:
    """A thin wrapper over ``onnxruntime.InferenceSession`` (which is itself thread-safe)."""

    def __init__(
        self, sess: ort.InferenceSession, threads: int | None, precision: str | None
    ) -> None:
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
            "precision": precision,
        }

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._sess.run(self._output_names, feeds)


def providers_for(device: str, preferred: list[str] | None = None) -> list[str]:
    """The providers to try for ``device``, best first, limited to those this build offers."""
    available = set(ort.get_available_providers())
    if preferred:
        wanted = [_CANONICAL.get(p.lower(), p) for p in preferred]
    elif device == "auto":
        wanted = PROVIDER_ORDER
    elif device.lower() in _DEVICE_PROVIDERS:
        wanted = _DEVICE_PROVIDERS[device.lower()]
    elif device.lower().endswith("executionprovider"):
        wanted = [_CANONICAL.get(device.lower(), device), CPU]
    else:
        raise EdgesmithError(
            f"onnxruntime does not know device '{device}'",
            hint="use auto, cpu, cuda, tensorrt, gpu, npu or an execution provider name",
        )
    chosen = [p for p in wanted if p in available]
    if CPU not in chosen:
        chosen.append(CPU)
    if device != "auto" and wanted[0] not in available:
        log.warning(
            "%s is not available in this onnxruntime build (it has %s); falling back to %s",
            wanted[0],
            ", ".join(sorted(available)),
            chosen[0],
        )
    return chosen


def _accelerators(providers: list[str]) -> list[str]:
    return [p for p in providers if p not in (CPU, "XnnpackExecutionProvider")]


def _missing_accelerator(target: str, wanted: list[str], why: str) -> ModelLoadError:
    return ModelLoadError(
        f"the '{target}' target runs this model on {' or '.join(wanted)}, but {why}",
        hint="install the GPU build of onnxruntime for the device (Jetson: NVIDIA's onnxruntime-gpu "
        "wheel for your JetPack, see docs/devices.md), or run it on the CPU: device='cpu' "
        "(--device cpu)",
    )


def _session_options(threads: int | None, options: dict[str, Any]) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    for key, value in options.get("session_config", {}).items():
        so.add_session_config_entry(str(key), str(value))
    return so


def _provider_options(provider: str, options: dict[str, Any]) -> dict[str, Any]:
    opts = dict(options.get("provider_options", {}).get(provider, {}))
    if provider == "CUDAExecutionProvider":
        # onnxruntime turns TF32 on by default (Ampere and newer, Jetson Orin included): 10-bit
        # mantissas moved fp32 logits by up to 1e-2 on an H200 (docs/benchmarks.md), beyond an fp32
        # bundle's golden tolerance. fp32 means fp32 unless the caller asks for precision "tf32".
        opts.setdefault("use_tf32", "1" if options.get("precision") == "tf32" else "0")
    if provider == "TensorrtExecutionProvider" and options.get("precision") == "fp16":
        opts.setdefault("trt_fp16_enable", True)
    return opts


def open_session(
    path: Path,
    device: str = "auto",
    threads: int | None = None,
    options: dict[str, Any] | None = None,
) -> OrtSession:
    """Open an ONNX model file on the best available execution provider for ``device``.

    Options: ``providers`` (an explicit order), ``provider_options`` ({provider: {key: value}}),
    ``session_config`` (onnxruntime session config entries), ``precision`` (``fp16`` lets
    TensorRT build fp16 engines, ``tf32`` lets CUDA use TF32 tensor cores; the default keeps the
    model's own precision: TF32, which onnxruntime enables by default, is turned off).
    """
    options = options or {}
    providers = providers_for(device, options.get("providers"))
    target = options.get("require_accelerator")
    wanted = _accelerators([_CANONICAL.get(p.lower(), p) for p in options.get("providers") or []])
    if target and wanted and not _accelerators(providers):
        raise _missing_accelerator(
            str(target),
            wanted,
            f"this onnxruntime {ort.__version__} build has only "
            f"{', '.join(sorted(ort.get_available_providers()))}",
        )
    so = _session_options(threads, options)
    sess = None
    while sess is None:
        try:
            sess = ort.InferenceSession(
                str(path),
                sess_options=so,
                providers=providers,
                provider_options=[_provider_options(p, options) for p in providers],
            )
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if len(providers) > 1:
                log.warning(
                    "%s failed to initialise (%s); trying %s", providers[0], msg, providers[1]
                )
                providers = providers[1:]
                continue
            raise ModelLoadError(
                f"onnxruntime cannot load {path.name}: {msg[:300]}",
                hint="is the file complete and a valid ONNX model? re-export it",
            ) from None
    running = sess.get_providers()[0]
    if target and wanted and running not in wanted:
        raise _missing_accelerator(
            str(target), wanted, f"{' and '.join(wanted)} failed to initialise (see the log)"
        )
    if running != providers[0]:
        log.warning(
            "execution provider %s failed to initialise; running on %s", providers[0], running
        )
    log.info("onnxruntime %s on %s", path.name, running)
    precision = None
    if running == "TensorrtExecutionProvider" and options.get("precision") == "fp16":
        precision = "fp16"
    elif running == "CUDAExecutionProvider" and options.get("precision") == "tf32":
        precision = "tf32"
    return OrtSession(sess, threads, precision)
