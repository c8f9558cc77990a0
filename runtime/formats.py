"""The model file formats edgesmith builds and runs: one table.

Each format has its manifest name (``format`` in a bundle, ``formats`` in a profile and a
recipe), its model file suffix, the files that travel with the model file, and the runtime
backends that run it, preferred first. The exporters (:mod:`edgesmith.export`), the backends
(:mod:`edgesmith.runtime.backends`), ``bundle create`` and the manifest and profile schemas read
it; a new format adds one row here, one backend module and one exporter module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["FORMATS", "FormatName", "ModelFormat", "format_of_file"]

# the manifest's and profiles' ``format`` values (kept equal to FORMATS' keys; checked in tests)
FormatName = Literal["onnx", "tflite", "openvino"]


@dataclass(frozen=True)
class ModelFormat:
    """A model file format: its name, suffix, side files and the backends that run it."""

    name: str
    suffix: str
    backends: tuple[str, ...]  # preferred first
    side_suffixes: tuple[str, ...] = ()  # files beside the model file (OpenVINO's .bin)

    def files(self, path: Path) -> list[Path]:
        """The model file and its side files."""
        return [path, *(path.with_suffix(s) for s in self.side_suffixes)]


FORMATS: dict[str, ModelFormat] = {
    "onnx": ModelFormat("onnx", ".onnx", ("onnxruntime", "openvino")),
    "tflite": ModelFormat("tflite", ".tflite", ("litert",)),
    "openvino": ModelFormat("openvino", ".xml", ("openvino",), (".bin",)),
}


def format_of_file(path: str | Path) -> ModelFormat | None:
    """The format of a model file, by its suffix (None: not a model file edgesmith knows)."""
    suffix = Path(path).suffix.lower()
    return next((f for f in FORMATS.values() if f.suffix == suffix), None)
