"""Screen an ONNX file before a backend opens it, without the ``onnx`` package.

The file is walked at the protobuf wire level (a few hundred lines of Python would be needed for
a full parser; only the fields that matter are read): every tensor that keeps its bytes in an
external file must name a relative path that stays inside the model's folder after symbolic links
are resolved (DESIGN.md section 8). onnxruntime 1.32 and OpenVINO 2026.4 refuse such paths too,
but older releases did not, so the runtime never relies on the backend for it. The walk also sums
the bytes of the initializers per data type, which ``model.info`` reports as the weights' precision.
"""

from __future__ import annotations

import mmap
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesmith.errors import ModelLoadError

__all__ = ["OnnxScan", "scan_onnx"]

# TensorProto.DataType -> short precision name
_DTYPES = {
    1: "fp32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "fp16",
    11: "fp64",
    12: "uint32",
    13: "uint64",
    16: "bf16",
    17: "fp8",
    18: "fp8",
    19: "fp8",
    20: "fp8",
    21: "uint4",
    22: "int4",
}
_MAX_DEPTH = 64

# message kind -> {field number: message kind} for the length-delimited fields that can hold a
# tensor (directly or through nested graphs, nodes, attributes and functions)
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


@dataclass
class OnnxScan:
    """What the screen found: external data files and initializer bytes per data type."""

    external: list[str] = field(default_factory=list)
    weight_bytes: Counter[str] = field(default_factory=Counter)

    @property
    def precision(self) -> str:
        """The data type holding most of the weights (``fp32``, ``fp16``, ``int8``, ...)."""
        if not self.weight_bytes:
            return "unknown"
        return self.weight_bytes.most_common(1)[0][0]


class _Truncated(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Truncated
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value or (start, end) of the payload)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield num, wire, value
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Truncated
            yield num, wire, (pos, pos + n)
            pos += n
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:  # groups (3, 4) are not used by onnx.proto; anything else is not protobuf
            raise _Truncated
        if pos > end:
            raise _Truncated


def _tensor(buf: memoryview, start: int, end: int, out: OnnxScan, name_hint: str) -> None:
    dtype = 0
    nbytes = 0
    location: str | None = None
    name = name_hint
    for num, wire, value in _fields(buf, start, end):
        if num == 2 and wire == 0:
            dtype = int(value)
        elif num == 8 and wire == 2:
            s, e = value
            name = bytes(buf[s:e]).decode("utf-8", "replace")
        elif num == 9 and wire == 2:
            s, e = value
            nbytes += e - s
        elif num == 13 and wire == 2:
            key = val = ""
            s, e = value
            for n2, w2, v2 in _fields(buf, s, e):
                if w2 == 2:
                    a, b = v2
                    text = bytes(buf[a:b]).decode("utf-8", "replace")
                    key, val = (text, val) if n2 == 1 else (key, text)
            if key == "location":
                location = val
            elif key == "length" and val.isascii() and val.isdigit() and len(val) < 20:
                nbytes += int(val)
    if location is not None:
        out.external.append(location)
        if not location:
            raise ModelLoadError(
                f"tensor '{name}' has an empty external data location",
                hint="the model file is malformed; re-export it",
            )
    if dtype in _DTYPES and nbytes:
        out.weight_bytes[_DTYPES[dtype]] += nbytes


def _walk(buf: memoryview, start: int, end: int, kind: str, out: OnnxScan, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ModelLoadError(
            f"ONNX graph nesting is deeper than {_MAX_DEPTH} levels",
            hint="the file is malformed or hostile; re-export it",
        )
    children = _CHILDREN[kind]
    for num, wire, value in _fields(buf, start, end):
        child = children.get(num)
        if child is None or wire != 2:
            continue
        s, e = value
        if child == "tensor":
            _tensor(buf, s, e, out, "?")
        else:
            _walk(buf, s, e, child, out, depth + 1)


def _check_location(loc: str, root: Path, model: Path) -> None:
    hint = "external data files must sit in the model's folder (or below it); re-export the model"
    if not loc.isprintable():  # a NUL byte would reach the OS; control characters a terminal
        shown = loc.encode("unicode_escape").decode("ascii")[:200]
        raise ModelLoadError(
            f"{model.name} names an external data file with control characters: '{shown}'",
            hint=hint,
        )
    p = Path(loc)
    if p.is_absolute() or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
        raise ModelLoadError(
            f"{model.name} points its external data at an absolute path '{loc}'", hint=hint
        )
    real = Path(os.path.realpath(root / p))
    if real != root and root not in real.parents:
        raise ModelLoadError(
            f"{model.name} points its external data outside its folder: '{loc}' resolves to {real}",
            hint=hint,
        )


def scan_onnx(path: str | Path) -> OnnxScan:
    """Screen an ONNX file: refuse external data paths that leave its folder.

    Returns:
        The external data locations and the initializer bytes per data type.

    Raises:
        ModelLoadError: the file is not protobuf (truncated, corrupt), or an external data path is
            absolute, empty, or resolves (through ``..`` or links) outside the model's folder.

    Example:
        >>> scan_onnx("model.onnx").precision     # doctest: +SKIP
        'fp32'
    """
    path = Path(path)
    out = OnnxScan()
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(
            f"{path} is empty", hint="the file is truncated; export or download it again"
        )
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            _walk(buf, 0, size, "model", out, 0)
        except _Truncated:
            raise ModelLoadError(
                f"{path.name} is not a complete ONNX model (protobuf parsing stopped early)",
                hint="the file is truncated or corrupt; export or download it again",
            ) from None
        finally:
            buf.release()
    root = Path(os.path.realpath(path.parent))
    for loc in out.external:
        _check_location(loc, root, path)
    return out
