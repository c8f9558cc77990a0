"""OpenVINO export with ``openvino.convert_model``: an IR pair (``.xml`` graph + ``.bin`` weights).

``ov.save_model`` compresses weights to FP16 by default, which costs about 1e-3 of parity with
PyTorch; here FP16 weights are an explicit option (``compress_to_fp16``), off by default.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgesmith.errors import ExportError
from edgesmith.export._io import DynamicDims

__all__ = ["export", "name_io", "save_ir"]


def name_io(ov_model: Any, input_names: list[str], output_names: list[str]) -> None:
    """Give the model's input and output tensors stable names (the runtime addresses them by name)."""
    for port, name in zip(ov_model.inputs, input_names, strict=False):
        port.get_tensor().set_names({name})
    for port, name in zip(ov_model.outputs, output_names, strict=False):
        port.get_tensor().set_names({name})


def save_ir(ov_model: Any, path: str | Path, *, compress_to_fp16: bool = False) -> Path:
    """Write ``ov_model`` as ``path`` (.xml) and its .bin, both through temporary names, then renamed.

    Returns:
        The ``.xml`` path.
    """
    import openvino as ov

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.xml")
    try:
        ov.save_model(ov_model, str(tmp), compress_to_fp16=compress_to_fp16)
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_suffix(".bin")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    return path


def export(
    model: Any,
    example_inputs: Sequence[Any],
    path: str | Path,
    *,
    compress_to_fp16: bool = False,
    dynamic_batch: bool = True,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_dims: DynamicDims | None = None,
) -> Path:
    """Convert ``model`` to an OpenVINO IR (``path`` = the ``.xml``; the ``.bin`` goes beside it).

    Args:
        model: a torch.nn.Module in eval mode.
        example_inputs: one tensor per model input, batch first.
        path: the ``.xml`` file to write.
        compress_to_fp16: store weights as FP16 (half the size; ~1e-3 off PyTorch's outputs).
        dynamic_batch: make dimension 0 of every input dynamic.
        input_names / output_names: tensor names; default ``input``/``output`` (``_i`` suffixed if several).
        dynamic_dims: per input, the dimensions to leave dynamic (``{index: DynamicDim}``);
            default: the batch when ``dynamic_batch``.

    Returns:
        The ``.xml`` path written.

    Example:
        >>> export(net.eval(), (torch.randn(1, 3, 32, 32),), "out/net.xml")  # doctest: +SKIP
    """
    import openvino as ov
    import torch

    from edgesmith.export._io import batch_dims, io_names, trace_inputs
    from edgesmith.export._quiet import quiet

    path = Path(path)
    input_names, output_names = io_names(model, example_inputs, input_names, output_names)
    if dynamic_dims is None:
        dynamic_dims = batch_dims(len(example_inputs)) if dynamic_batch else []
    free = [dict(d) for d in dynamic_dims] + [{}] * (len(example_inputs) - len(dynamic_dims))
    traced = trace_inputs(example_inputs, any(0 in d for d in free))
    try:
        with quiet(), torch.no_grad():
            ov_model = ov.convert_model(model, example_input=tuple(traced))
        shapes = {
            i: ov.PartialShape([-1 if d in free[i] else int(n) for d, n in enumerate(x.shape)])
            for i, x in enumerate(example_inputs)
        }
        ov_model.reshape(shapes)
    except Exception as exc:
        from edgesmith.export.diagnose import diagnose

        raise diagnose(exc, "openvino", model, example_inputs) from exc
    name_io(ov_model, input_names, output_names)
    try:
        return save_ir(ov_model, path, compress_to_fp16=compress_to_fp16)
    except (OSError, RuntimeError) as exc:
        raise ExportError(
            f"cannot write {path}: {exc}", hint="check the folder exists and is writable"
        ) from exc
