"""TFLite (LiteRT) export with litert-torch: one ``.tflite`` flatbuffer with a fixed batch size.

litert-torch lowers a ``torch.export`` graph to TFLite ops; the runtime runs a batch-1 model
sample by sample when handed a larger batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgesmith.errors import ExportError

__all__ = ["export"]


def export(
    model: Any,
    example_inputs: Sequence[Any],
    path: str | Path,
    *,
    quant_config: Any = None,
) -> Path:
    """Convert ``model`` to a ``.tflite`` file with the example inputs' shapes (batch 1 as a rule).

    Args:
        model: a torch.nn.Module in eval mode (or a PT2E-quantized GraphModule, with ``quant_config``).
        example_inputs: one tensor per model input.
        path: the ``.tflite`` file to write (through a temporary name, then renamed).
        quant_config: a ``litert_torch.QuantConfig`` for PT2E-quantized models; None for float.

    Returns:
        The path written.

    Example:
        >>> export(net.eval(), (torch.randn(1, 1, 28, 28),), "out/net.tflite")  # doctest: +SKIP
    """
    import torch

    from edgesmith.export._quiet import quiet

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with quiet(), torch.no_grad():
            import litert_torch

            edge = litert_torch.convert(model, tuple(example_inputs), quant_config=quant_config)
    except Exception as exc:
        from edgesmith.export.diagnose import diagnose

        raise diagnose(exc, "tflite", model, example_inputs) from exc
    try:
        with quiet():
            edge.export(str(tmp))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        raise ExportError(
            f"cannot write {path}: {exc}", hint="check the folder exists and is writable"
        ) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path
