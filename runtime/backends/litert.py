"""LiteRT backend through ``ai_edge_litert`` (or its predecessor ``tflite_runtime``).

Quantized input and output tensors (full-integer models) are (de)quantized here with the
tensor's scale and zero point, so callers always pass and receive float arrays. A model
exported with batch 1 runs a larger batch sample by sample.

Delegates: XNNPACK (built into the interpreter) by default; an external delegate by the path of
its shared library (``options["delegate"]``), e.g. the Edge TPU's ``libedgetpu.so.1``, which
``device="edgetpu"`` asks for. A delegate that fails to load is logged and XNNPACK runs instead.
The model is read into memory rather than memory-mapped, so that an OTA agent rewriting the
file's slot cannot pull pages from under a running interpreter.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import ModelLoadError
from edgesmith.runtime.specs import TensorSpec

try:
    from ai_edge_litert.interpreter import Interpreter, load_delegate

    _PACKAGE = "ai_edge_litert"
except ImportError:  # pragma: no cover - depends on the install
    from tflite_runtime.interpreter import Interpreter, load_delegate  # type: ignore[no-redef, unused-ignore]

    _PACKAGE = "tflite_runtime"

__all__ = ["LiteRtSession", "open_session"]

log = logging.getLogger(__name__)

EDGETPU_DELEGATE = "libedgetpu.so.1"
_PRECISION = {"float32": "fp32", "float16": "fp16", "int8": "int8", "uint8": "int8"}


def _quant(detail: dict[str, Any]) -> tuple[float, int] | None:
    scale, zero = detail.get("quantization", (0.0, 0))
    return (float(scale), int(zero)) if scale and np.dtype(detail["dtype"]).kind in "iu" else None


class LiteRtSession:
    """A LiteRT interpreter with float-in, float-out handling of quantized I/O."""

    def __init__(self, interp: Any, path: Path, threads: int | None, delegate: str) -> None:
        self._interp = interp
        self._lock = threading.Lock()
        self._in = interp.get_input_details()
        self._out = interp.get_output_details()
        self._dynamic = [bool((d["shape_signature"] < 0).any()) for d in self._in]
        self._fixed_batch = [int(d["shape"][0]) if len(d["shape"]) else 0 for d in self._in]
        self.inputs = [self._spec(d) for d in self._in]
        self.outputs = [self._spec(d) for d in self._out]
        self.info: dict[str, Any] = {
            "backend": "litert",
            "package": _PACKAGE,
            "provider": delegate,
            "threads": threads,
            "quantized_io": any(_quant(d) for d in self._in + self._out),
        }
        self.info["weights"] = self.info["precision"] = _weights_precision(interp)

    def _spec(self, d: dict[str, Any]) -> TensorSpec:
        sig = d.get("shape_signature", d["shape"])
        shape: tuple[int | str, ...] = tuple(
            "batch" if i == 0 and (s < 0 or s == 1) else int(s) for i, s in enumerate(sig)
        )
        dtype = "float32" if _quant(d) else str(np.dtype(d["dtype"]))
        return TensorSpec(d["name"], shape, dtype)

    def _run_one(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        interp = self._interp
        for d, x, dyn in zip(self._in, arrays, self._dynamic, strict=True):
            if dyn and tuple(d["shape"]) != x.shape:
                interp.resize_tensor_input(d["index"], list(x.shape))
                interp.allocate_tensors()
                self._in = interp.get_input_details()
                self._out = interp.get_output_details()
                d = next(n for n in self._in if n["index"] == d["index"])
            q = _quant(d)
            if q:
                info = np.iinfo(d["dtype"])
                x = np.clip(np.round(x / q[0]) + q[1], info.min, info.max).astype(d["dtype"])
            interp.set_tensor(d["index"], x)
        interp.invoke()
        outs = []
        for d in self._out:
            y = interp.get_tensor(d["index"])
            q = _quant(d)
            outs.append((y.astype(np.float32) - q[1]) * q[0] if q else y.copy())
        return outs

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [feeds[s.name] for s in self.inputs]
        n = arrays[0].shape[0] if arrays and arrays[0].ndim else 1
        with self._lock:  # one interpreter: its tensors are shared state
            if all(self._dynamic) or self._fixed_batch[0] == n:
                return self._run_one(arrays)
            per_sample = [self._run_one([a[i : i + 1] for a in arrays]) for i in range(n)]
        return [np.concatenate([p[j] for p in per_sample]) for j in range(len(self._out))]


def _weights_precision(interp: Any) -> str:
    """The data type holding most constant bytes (weights) of the model."""
    sizes: dict[str, int] = {}
    for d in interp.get_tensor_details():
        if d["index"] in {x["index"] for x in interp.get_input_details()}:
            continue
        dt = str(np.dtype(d["dtype"]))
        sizes[dt] = sizes.get(dt, 0) + int(np.prod(d["shape"])) * np.dtype(d["dtype"]).itemsize
    if not sizes:
        return "unknown"
    top = max(sizes, key=lambda k: sizes[k])
    return _PRECISION.get(top, top)


def open_session(
    path: Path,
    device: str = "auto",
    threads: int | None = None,
    options: dict[str, Any] | None = None,
) -> LiteRtSession:
    """Open a ``.tflite`` file; XNNPACK by default, or ``options["delegate"]`` (a shared library path).

    ``device="edgetpu"`` asks for the Edge TPU delegate (``libedgetpu.so.1``); other devices run
    on the CPU.
    """
    options = options or {}
    delegates = []
    delegate_name = "XNNPACK"
    wanted = options.get("delegate") or (EDGETPU_DELEGATE if device.lower() == "edgetpu" else None)
    if wanted:
        try:
            ctypes.CDLL(
                str(wanted)
            )  # fails cleanly when absent (load_delegate leaves a broken object)
            delegates.append(load_delegate(str(wanted), dict(options.get("delegate_options", {}))))
            delegate_name = Path(str(wanted)).name
        except (ValueError, OSError, RuntimeError) as exc:
            log.warning("delegate %s failed to load (%s); falling back to XNNPACK", wanted, exc)
    try:
        interp = Interpreter(
            model_content=path.read_bytes(),
            num_threads=threads or None,
            experimental_delegates=delegates or None,
        )
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "unknown error")
        raise ModelLoadError(
            f"LiteRT cannot load {path.name}: {first[:300]}",
            hint="is the file complete? re-export it",
        ) from None
    log.info("litert %s with %s", path.name, delegate_name)
    return LiteRtSession(interp, path, threads, delegate_name)
