"""What the exporters share: default input/output names, and example inputs that keep the batch free."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["io_names", "trace_inputs"]


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

    if dynamic_batch and all(getattr(x, "shape", (0,))[0] == 1 for x in example_inputs):
        return [torch.cat([x, x]) for x in example_inputs]
    return list(example_inputs)
