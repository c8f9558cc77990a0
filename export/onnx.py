"""ONNX export with the torch dynamo exporter: one self-contained file, dynamic batch dimension."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgesmith.errors import ExportError

__all__ = ["export"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress and warnings by default; keep the console readable."""
    loggers = [
        logging.getLogger(n)
        for n in (
            "torch.onnx",
            "torch.export",
            "torch._dynamo",
            "onnxscript",
            "torch.fx.experimental.symbolic_shapes",
        )
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def export(
    model: Any,
    example_inputs: Sequence[Any],
    path: str | Path,
    *,
    opset: int = 20,
    dynamic_batch: bool = True,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
) -> Path:
    """Export ``model`` to a single ONNX file (weights inline, no ``.onnx.data``).

    Args:
        model: a torch.nn.Module in eval mode.
        example_inputs: one tensor per model input, batch first.
        path: the ``.onnx`` file to write (written to a temporary name, then renamed).
        opset: the ONNX opset.
        dynamic_batch: make dimension 0 of every input symbolic (``batch``).
        input_names / output_names: graph names; default ``input``/``output`` (``_i`` suffixed if several).

    Returns:
        The path written.
    """
    import torch
    from torch.export import Dim

    from edgesmith.export._io import io_names, trace_inputs

    path = Path(path)
    input_names, output_names = io_names(model, example_inputs, input_names, output_names)
    dynamic_shapes = (
        tuple({0: Dim("batch", min=1, max=1 << 16)} for _ in example_inputs)
        if dynamic_batch
        else None
    )
    example_inputs = trace_inputs(example_inputs, dynamic_batch)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with _quiet_exporter():
            torch.onnx.export(
                model,
                tuple(example_inputs),
                str(tmp),
                dynamo=True,
                external_data=False,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
        os.replace(tmp, path)
    except ExportError:
        raise
    except Exception as exc:
        from edgesmith.export.diagnose import diagnose

        raise diagnose(exc, "onnx", model, example_inputs) from exc
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    return path
