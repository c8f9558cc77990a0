"""Turn a converter's traceback into an op-support diagnosis: the op, the layer, the workarounds."""

from __future__ import annotations

import re
from typing import Any

from edgesmith.errors import ExportError, UnsupportedOpError

__all__ = ["diagnose"]

_OP_PATTERNS = [
    re.compile(
        r"(?:Unsupported|unsupported|not supported|No decomposition)[^']*'?(?P<op>(?:aten|prims|torchvision)[:.]{1,2}[\w.]+)"
    ),
    re.compile(r"(?P<op>(?:aten|prims)::[\w.]+)"),
    re.compile(r"(?P<op>aten\.[\w]+(?:\.[\w]+)?)"),
]

_WORKAROUNDS = {
    "onnx": [
        "try another opset (export.opset)",
        "export to openvino or tflite instead",
        "replace the module with an equivalent made of supported ops",
    ],
    "tflite": [
        "export to onnx or openvino instead",
        "replace the module with an equivalent made of supported ops",
    ],
    "openvino": [
        "export to onnx first and convert that",
        "replace the module with an equivalent made of supported ops",
    ],
}


def _layer_of(op: str, model: Any) -> str | None:
    """The first module whose type name suggests the op (best effort; None when unknown)."""
    short = op.split("::")[-1].split(".")[-1 if "::" in op else 1].lower().strip("_")
    try:
        for name, mod in model.named_modules():
            if name and short and short in type(mod).__name__.lower():
                return name
    except AttributeError:
        pass
    return None


def diagnose(exc: BaseException, fmt: str, model: Any = None) -> ExportError:
    """An UnsupportedOpError naming the op (and layer, if found), else an ExportError with the first line."""
    text = f"{exc}\n{exc.__cause__ or ''}"
    for pattern in _OP_PATTERNS:
        m = pattern.search(text)
        if m:
            op = m.group("op")
            return UnsupportedOpError(
                op, fmt, layer=_layer_of(op, model), workarounds=_WORKAROUNDS.get(fmt)
            )
    first = next(
        (line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__
    )
    return ExportError(
        f"{fmt} export failed: {type(exc).__name__}: {first[:300]}",
        hint="run with --debug for the converter's traceback; "
        + "; ".join(_WORKAROUNDS.get(fmt, [])),
    )
