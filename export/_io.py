"""What the exporters share: default input/output names, and example inputs that keep the batch free."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DynamicDim", "batch_dims", "dynamic_dims_of", "io_names", "trace_inputs"]


@dataclass(frozen=True)
class DynamicDim:
    """A dimension an exported model leaves free: its name and bounds (``max`` None: unbounded)."""

    name: str
    min: int = 1
    max: int | None = None


BATCH = DynamicDim("batch", 1, 1 << 16)
# per input: {dimension index: DynamicDim}
DynamicDims = Sequence[Mapping[int, DynamicDim]]


def batch_dims(n_inputs: int) -> list[dict[int, DynamicDim]]:
    """Only the batch (dimension 0) free, for every input: what ``dynamic_batch=True`` means."""
    return [{0: BATCH} for _ in range(n_inputs)]


def dynamic_dims_of(layouts: Sequence[Any]) -> list[dict[int, DynamicDim]]:
    """The free dimensions of each input (``edgesmith.feeds.InputLayout``): the batch, and every
    symbolic dimension with its ``max`` (dimensions of the same name stay equal)."""
    out = []
    for lay in layouts:
        dims = {0: BATCH}
        for i, (_example, mx) in lay.sizes.items():
            dims[i] = DynamicDim(str(lay.shape[i]), 1, mx)
        out.append(dims)
    return out


def io_names(
    model: Any,
    example_inputs: Sequence[Any],
    input_names: list[str] | None,
    output_names: list[str] | None,
) -> tuple[list[str], list[str]]:
    """The graph's input and output names: as given, else ``input``/``output`` (``_i`` suffixed if
    several). Runs ``model`` once on the example to count its outputs."""
    import torch

    n_in = len(example_inputs)
    inputs = input_names or (["input"] if n_in == 1 else [f"input_{i}" for i in range(n_in)])
    with torch.no_grad():
        out = model(*example_inputs)
    n_out = len(out) if isinstance(out, tuple | list) else 1
    outputs = output_names or (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
    return inputs, outputs


def trace_inputs(example_inputs: Sequence[Any], dynamic_batch: bool) -> list[Any]:
    """The example inputs to trace with: doubled along the batch when every batch is 1.

    Tracers specialise a dimension of size 1 (torch.export's 0/1 specialisation; OpenVINO bakes it
    into reshapes of recurrent nets) and the batch would silently become fixed.
    """
    import torch

    example_inputs = [torch.as_tensor(x) for x in example_inputs]
    if dynamic_batch and all(getattr(x, "shape", (0,))[0] == 1 for x in example_inputs):
        return [torch.cat([x, x]) for x in example_inputs]
    return list(example_inputs)
