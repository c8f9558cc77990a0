"""Turn a converter's traceback into an op-support diagnosis: the op, the layer, the workarounds.

Each converter words it differently (torch.onnx: "Unsupported ... aten.histc", OpenVINO: "No
conversion rule found for operations: aten::histc", litert-torch: "Lowering not found:
aten.histc.default"). The op is located in the model by exporting it with ``torch.export`` and
reading the ``nn_module_stack`` of the first node that calls it, which names the layer precisely.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from edgesmith.errors import ExportError, UnsupportedOpError
from edgesmith.runtime.formats import FORMATS

__all__ = ["diagnose", "locate_op"]

_OP_PATTERNS = [
    re.compile(r"No conversion rule found for operations?:\s*(?P<op>[\w:.]+)"),
    re.compile(r"Lowering not found:\s*(?P<op>[\w:.]+)"),
    re.compile(
        r"(?:Unsupported|unsupported|not supported|No decomposition)[^']*'?(?P<op>(?:aten|prims|torchvision)[:.]{1,2}[\w.]+)"
    ),
    re.compile(r"(?P<op>(?:aten|prims)::[\w.]+)"),
    re.compile(r"(?P<op>aten\.[\w]+(?:\.[\w]+)?)"),
]

_FORMATS = tuple(sorted(FORMATS))  # the format table, in a stable order for messages
_SPECIFIC = {
    "onnx": ["try another opset (export.opset)"],
    "openvino": ["export to onnx and let OpenVINO read the .onnx file"],
    "tflite": [],
}


def _workarounds(fmt: str) -> list[str]:
    others = " or ".join(f for f in _FORMATS if f != fmt)
    return [
        *_SPECIFIC.get(fmt, []),
        f"export to {others} instead",
        "replace the module with an equivalent made of supported ops",
    ]


def _short(op: str) -> str:
    """``aten::histc``, ``aten.histc.default`` -> ``histc``."""
    return re.split(r"::|\.", op.removeprefix("torch.ops."))[1 if "." in op or "::" in op else 0]


def locate_op(model: Any, example_inputs: Sequence[Any], op: str) -> tuple[str | None, str | None]:
    """The module path and source line of the first call of ``op`` in ``model`` (best effort).

    Returns:
        ``(layer, source)``; either is None when it cannot be found.
    """
    try:
        import torch

        with torch.no_grad():
            ep = torch.export.export(model, tuple(example_inputs), strict=False)
    except Exception:  # the op may defeat torch.export too; fall back to the class-name heuristic
        return _layer_by_type(op, model), None
    short = _short(op)
    for node in ep.graph.nodes:
        if node.op != "call_function" or _short(str(node.target)) != short:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        layer = None
        if stack:
            path = list(stack.values())[-1][0]
            layer = (
                re.sub(r"^L\['self'\]\.?", "", str(path))
                .replace("_modules['", "")
                .replace("']", "")
            )
        trace = str(node.meta.get("stack_trace") or "").strip().splitlines()
        src = next((ln.strip() for ln in reversed(trace) if ln.strip().startswith("File ")), None)
        return layer or None, src
    return _layer_by_type(op, model), None


def _layer_by_type(op: str, model: Any) -> str | None:
    """The first module whose type name contains the op's name (None when unknown)."""
    short = _short(op).lower().strip("_")
    try:
        for name, mod in model.named_modules():
            if name and short and short in type(mod).__name__.lower():
                return name
    except AttributeError:
        pass
    return None


def diagnose(
    exc: BaseException, fmt: str, model: Any = None, example_inputs: Sequence[Any] | None = None
) -> ExportError:
    """An UnsupportedOpError naming the op, its layer and the workarounds; else an ExportError.

    Args:
        exc: what the converter raised.
        fmt: the format being written (onnx, openvino, tflite).
        model: the PyTorch model, to find the layer that uses the op.
        example_inputs: inputs for ``torch.export``, to find the layer precisely.
    """
    text = f"{exc}\n{exc.__cause__ or ''}"
    for pattern in _OP_PATTERNS:
        m = pattern.search(text)
        if m:
            op = m.group("op").rstrip(".,")
            if example_inputs is not None and model is not None:
                layer, src = locate_op(model, example_inputs, op)
            else:
                layer, src = _layer_by_type(op, model), None
            err = UnsupportedOpError(op, fmt, layer=layer, workarounds=_workarounds(fmt))
            if src:
                err.message += f" (called at {src})"
                err.args = (err.message,)
            return err
    first = next(
        (line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__
    )
    return ExportError(
        f"{fmt} export failed: {type(exc).__name__}: {first[:300]}",
        hint="run with --debug for the converter's traceback; " + "; ".join(_workarounds(fmt)),
    )
