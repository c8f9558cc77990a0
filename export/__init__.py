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

from edgesmith.runtime.formats import FORMATS

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


# one exporter module per format of the format table (edgesmith.runtime.formats): export/<name>.py
EXPORTERS: dict[str, Format] = {
    name: Format(name, f.suffix, f"edgesmith.export.{name}", f.backends[0], f.side_suffixes)
    for name, f in FORMATS.items()
}


def get_exporter(fmt: str) -> Callable[..., Path]:
    """The ``export`` function of a format (imports its library now)."""
    module: Any = importlib.import_module(EXPORTERS[fmt].module)
    return module.export
