"""Exporters: parallel modules with one signature, ``export(model, example_inputs, path, **opts) -> Path``.

Each imports its heavy library inside itself; ``EXPORTERS`` maps a recipe's format name to its
description. A later format adds one module and one entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EXPORTERS", "Format", "get_exporter"]


@dataclass(frozen=True)
class Format:
    """A model file format: its suffix, the exporter module, and the runtime backend that runs it.

    ``side_suffixes`` name the files that travel with the model file (OpenVINO's ``.bin``).
    """

    name: str
    suffix: str
    module: str
    backend: str
    side_suffixes: tuple[str, ...] = ()

    def files(self, path: Path) -> list[Path]:
        """The model file and its side files."""
        return [path, *(path.with_suffix(s) for s in self.side_suffixes)]


EXPORTERS: dict[str, Format] = {
    "onnx": Format("onnx", ".onnx", "edgesmith.export.onnx", "onnxruntime"),
    "tflite": Format("tflite", ".tflite", "edgesmith.export.tflite", "litert"),
    "openvino": Format("openvino", ".xml", "edgesmith.export.openvino", "openvino", (".bin",)),
}


def get_exporter(fmt: str) -> Callable[..., Path]:
    """The ``export`` function of a format (imports its library now)."""
    module: Any = importlib.import_module(EXPORTERS[fmt].module)
    return module.export
