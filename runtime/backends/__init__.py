"""Inference backends behind one small interface.

Each backend module provides ``open_session(path, device, threads, options) -> Session`` where a
session has ``inputs``/``outputs`` (lists of TensorSpec), ``info`` (a dict saying what actually
runs: backend, provider, precision) and ``run(feeds) -> list[np.ndarray]``, safe to call from
several threads. Modules are imported only when used, so a device
pays only for the backend it has.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from edgesmith.errors import EdgesmithError
from edgesmith.runtime.formats import FORMATS
from edgesmith.runtime.specs import TensorSpec

__all__ = [
    "BACKENDS",
    "DEVICE_BACKENDS",
    "FORMAT_BACKENDS",
    "Session",
    "backend_for",
    "get_backend",
]

# backend name -> (module implementing open_session(), pip install hint, importable libraries)
BACKENDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "onnxruntime": ("edgesmith.runtime.backends.onnxruntime", "onnxruntime", ("onnxruntime",)),
    "openvino": ("edgesmith.runtime.backends.openvino", "openvino", ("openvino",)),
    "litert": (
        "edgesmith.runtime.backends.litert",
        "ai-edge-litert",
        ("ai_edge_litert", "tflite_runtime"),
    ),
}

# model file suffix -> backends that can run it, preferred first (the format table)
FORMAT_BACKENDS: dict[str, list[str]] = {f.suffix: list(f.backends) for f in FORMATS.values()}


class Session(Protocol):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    info: dict[str, Any]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def get_backend(name: str) -> ModuleType:
    """Import a backend module by name, with an install hint when its library is missing."""
    if name not in BACKENDS:
        raise EdgesmithError(
            f"unknown backend '{name}'", hint=f"known backends: {', '.join(BACKENDS)}"
        )
    module, package, _ = BACKENDS[name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EdgesmithError(
            f"backend '{name}' is not installed ({exc.name} missing)",
            hint=f"pip install {package}, or pick another backend",
        ) from None


# devices only one backend knows: an ONNX file asked to run on them goes to that backend
DEVICE_BACKENDS: dict[str, str] = {"npu": "openvino", "edgetpu": "litert"}


def _installed(name: str) -> bool:
    return any(importlib.util.find_spec(lib) is not None for lib in BACKENDS[name][2])


def backend_for(path: Path, preferred: str | None = None, device: str = "auto") -> str:
    """The backend that runs ``path`` on ``device``: ``preferred`` if it can, else the first installed one.

    Order for ``.onnx``: onnxruntime, then OpenVINO; ``.xml`` needs OpenVINO, ``.tflite`` LiteRT.
    A device that only one backend knows (``npu``: OpenVINO) picks that backend when it can run
    the file.
    """
    suffix = path.suffix.lower()
    candidates = FORMAT_BACKENDS.get(suffix)
    if not candidates:
        raise EdgesmithError(
            f"cannot tell the format of {path.name}",
            hint=f"supported model files: {', '.join(FORMAT_BACKENDS)}, or a bundle folder",
        )
    if preferred:
        if preferred not in candidates:
            raise EdgesmithError(
                f"backend '{preferred}' cannot run {suffix} files",
                hint=f"use one of: {', '.join(candidates)}",
            )
        return preferred
    special = DEVICE_BACKENDS.get(device.lower().split(".")[0])
    if special in candidates and _installed(special):
        return special
    for name in candidates:
        if _installed(name):
            return name
    return candidates[0]  # get_backend() will say how to install it
