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
from edgesmith.export._io import DynamicDim, DynamicDims

__all__ = ["export", "rename_io"]

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
    dynamic_dims: DynamicDims | None = None,
) -> Path:
    """Export ``model`` to a single ONNX file (weights inline, no ``.onnx.data``).

    Args:
        model: a torch.nn.Module in eval mode.
        example_inputs: one tensor per model input, batch first.
        path: the ``.onnx`` file to write (written to a temporary name, then renamed).
        opset: the ONNX opset.
        dynamic_batch: make dimension 0 of every input symbolic (``batch``).
        input_names / output_names: graph names; default ``input``/``output`` (``_i`` suffixed if several).
        dynamic_dims: per input, ``{dimension: DynamicDim}`` to leave free (e.g. the batch and a
            ``sequence`` up to 128); dimensions of the same name stay equal. Default: the batch
            when ``dynamic_batch``.

    Returns:
        The path written.
    """
    import torch
    from torch.export import Dim

    from edgesmith.export._io import batch_dims, io_names, trace_inputs

    path = Path(path)
    input_names, output_names = io_names(model, example_inputs, input_names, output_names)
    if dynamic_dims is None and dynamic_batch:
        dynamic_dims = batch_dims(len(example_inputs))
    dynamic_shapes = None
    if dynamic_dims:
        made: dict[str, Any] = {}  # one Dim object per name: equal sizes stay equal

        def dim(d: DynamicDim) -> Any:
            if d.name not in made:
                made[d.name] = Dim(d.name, min=d.min, max=d.max or (1 << 16))
            return made[d.name]

        dynamic_shapes = tuple({i: dim(d) for i, d in dims.items()} for dims in dynamic_dims)
    example_inputs = trace_inputs(example_inputs, bool(dynamic_dims and dynamic_dims[0].get(0)))
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with _quiet_exporter():
            # the graph is named afterwards: the exporter keeps its own value names (an output
            # called "embedding" would collide with aten.embedding's value and break the graph)
            torch.onnx.export(
                model,
                tuple(example_inputs),
                str(tmp),
                dynamo=True,
                external_data=False,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
        rename_io(tmp, input_names, output_names)
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


def rename_io(path: Path, input_names: Sequence[str], output_names: Sequence[str]) -> None:
    """Name the graph inputs and outputs of the ONNX file ``path`` in place; an internal value
    that already holds one of the names is renamed out of the way (``name_1``)."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    targets = {v.name: n for v, n in zip(g.input, input_names, strict=False)}
    targets |= {v.name: n for v, n in zip(g.output, output_names, strict=False)}
    values = (
        {i.name for i in g.initializer} | {v.name for v in g.input} | {v.name for v in g.value_info}
    )
    for node in g.node:
        values.update(node.input)
        values.update(node.output)
    wanted = set(targets.values())
    mapping: dict[str, str] = {}
    taken = values | wanted
    for name in sorted(values):
        if name in wanted and targets.get(name) != name:
            k = 1
            while f"{name}_{k}" in taken:
                k += 1
            mapping[name] = f"{name}_{k}"
            taken.add(mapping[name])
    mapping.update({old: new for old, new in targets.items() if old != new})
    if not mapping:
        return

    def rn(names: Any) -> None:
        for j, n in enumerate(names):
            if n in mapping:
                names[j] = mapping[n]

    for node in g.node:
        rn(node.input)
        rn(node.output)
    for v in [*g.input, *g.output, *g.value_info, *g.initializer]:
        if v.name in mapping:
            v.name = mapping[v.name]
    onnx.save(model, str(path))
