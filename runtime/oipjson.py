"""Read an OIP v2 JSON request body without turning its tensor data into Python objects first.

A JSON parser makes a Python object of every number (32 bytes for a float, 64 and more for a
small list), so that a few MiB of ``[[0],[0],...]`` take hundreds of MiB before a request can be
checked. Here the ``"data"`` arrays of numbers are found first (one regular-expression pass, in
C) and replaced by placeholders; the small rest of the request (the *skeleton*: names, shapes,
datatypes, parameters) is parsed with orjson and capped in size. The numbers themselves are
parsed only later, by :meth:`RawData.decode`, after the declared shapes and sizes were checked,
straight into an array of the request's datatype, a slice at a time (so at most one slice of
Python numbers exists at once). Arrays this fast path does not read (``true``/``false``,
``NaN``, strings) stay in the skeleton and are decoded as before.
"""

from __future__ import annotations

import functools
import json
import math
import re
import secrets
from typing import Any

import numpy as np

try:  # orjson parses JSON ~8x faster than json
    import orjson
except ImportError:  # pragma: no cover - depends on the install
    orjson = None  # type: ignore[assignment]

__all__ = ["MAX_DEPTH", "BodyError", "RawData", "loads", "parse_body"]

_WS = rb"[ \t\r\n]*+"
# a "data" key and its array value when the array holds only numbers and brackets: the greedy
# class stops at the first '"' or '}' after the array and backs off to its closing bracket
_DATA = re.compile(rb'"data"' + _WS + rb":" + _WS + rb"(\[[-+.,0-9eE \t\r\n\[\]]*\])")
_LEADING = re.compile(rb"(?:\[" + _WS + rb")++")
_EMPTY = re.compile(rb"\[" + _WS + rb"\]")
_INNERMOST = re.compile(rb"\[[^\[\]]*+\]")
_BRACKETS = bytes.maketrans(b"[]", b"  ")
_LONG_INTEGER = re.compile(rb"[0-9]{20}")
_SLICE = 1 << 18  # bytes of number text parsed at once
MAX_DEPTH = 32
_INT_RANGE = {
    "int8": (-(1 << 7), (1 << 7) - 1),
    "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
    "uint8": (0, (1 << 8) - 1),
    "uint16": (0, (1 << 16) - 1),
    "uint32": (0, (1 << 32) - 1),
    "uint64": (0, (1 << 64) - 1),
}
_PLACEHOLDER_BYTES = 24


class BodyError(ValueError):
    """A body :func:`parse_body` refuses: ``status`` (400 or 413) and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _loads(text: bytes) -> Any:
    if orjson is not None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:  # NaN/Infinity literals (json takes them), or an error
            pass
    return json.loads(text)


def loads(text: bytes) -> Any:
    """Parse JSON (orjson; Python's json for NaN/Infinity literals); BodyError 400 if invalid."""
    try:
        return _loads(text)
    except (ValueError, RecursionError) as exc:
        raise BodyError(400, f"the body is not valid JSON: {str(exc)[:200]}") from None


class RawData:
    """The text of one ``data`` array of numbers, parsed only by :meth:`decode`."""

    __slots__ = ("_body", "_end", "_start")

    def __init__(self, body: bytes, start: int, end: int) -> None:
        self._body, self._start, self._end = body, start, end

    @property
    def nbytes(self) -> int:
        """Bytes of JSON text."""
        return self._end - self._start

    def decode(self, dtype: str, shape: list[int]) -> np.ndarray:
        """The numbers of the array, in row-major order, as an array of ``dtype`` and ``shape``.

        The array may be flat or nested to any depth up to :data:`MAX_DEPTH` as long as every
        number sits at the same depth (the lengths of the inner arrays are not checked against
        the shape, as in Triton: only the total count). Integer datatypes take JSON integers
        within their range only.

        Raises:
            ValueError: not a JSON array of numbers, another count, values out of range.
        """
        body, s, e = self._body, self._start, self._end
        count = math.prod(shape)
        if count == 0:
            if _EMPTY.fullmatch(body, s, e) is None:
                raise ValueError("the shape holds no values, so 'data' must be []")
            return np.zeros(shape, dtype)
        if dtype == "bool":
            raise ValueError("BOOL data must be JSON true or false")
        lead = _LEADING.match(body, s, e)
        depth = body[s : lead.end()].count(b"[") if lead else 0
        if depth > MAX_DEPTH:
            raise ValueError(f"it nests deeper than {MAX_DEPTH} levels")
        if depth == 1:
            text = body[s + 1 : e - 1]
            if b"[" in text or b"]" in text:
                raise ValueError("it mixes numbers and arrays at one level")
        else:
            span = body[s:e]
            _check_nesting(span, depth)
            text = span.translate(_BRACKETS)
            del span
        found = text.count(b",") + 1  # after the checks, each comma sits between two numbers
        if found != count:
            raise ValueError(f"it holds {found} values but shape {list(shape)} needs {count}")
        lo_hi = _INT_RANGE.get(dtype)
        if lo_hi is not None and (b"." in text or b"e" in text or b"E" in text):
            raise ValueError(f"{dtype} data must be integers")
        out = np.empty(count, dtype)
        filled = _fill(out, text, lo_hi)
        if filled != count:  # not reached: the count was checked
            raise ValueError(f"it holds {filled} values but shape {list(shape)} needs {count}")
        return out.reshape(shape)


def _fill(out: np.ndarray, text: bytes, lo_hi: tuple[int, int] | None) -> int:
    """Parse the comma-separated numbers of ``text`` into ``out``, one slice at a time."""
    pos, i, n = 0, 0, len(text)
    while pos < n:
        end = text.find(b",", pos + _SLICE)
        end = n if end < 0 else end
        part = text[pos:end]
        pos = end + 1
        if orjson is not None:
            values = orjson.loads(b"[" + part + b"]")
        else:  # pragma: no cover - depends on the install
            values = json.loads(b"[" + part + b"]")
        if (
            lo_hi is not None
            and _LONG_INTEGER.search(part)
            and any(type(v) is not int for v in values)
        ):
            # orjson reads integers beyond 64 bits as floats
            raise ValueError(f"a value is out of the range [{lo_hi[0]}, {lo_hi[1]}]")
        if i + len(values) > out.size:
            raise ValueError(f"it holds more than {out.size} values")
        try:
            out[i : i + len(values)] = values
        except OverflowError:
            raise ValueError(
                f"a value is out of the {out.dtype} range"
                + (f" [{lo_hi[0]}, {lo_hi[1]}]" if lo_hi else "")
            ) from None
        i += len(values)
    return i


@functools.lru_cache(maxsize=MAX_DEPTH)
def _nested(depth: int) -> re.Pattern[bytes]:
    """Arrays nesting exactly ``depth`` levels around ``a`` leaves (each appears once in the
    pattern, so it grows linearly with ``depth``; nothing backtracks)."""
    item = rb"a"
    for _ in range(depth):
        item = rb"\[(?:" + _WS + item + _WS + rb"(?:,(?!" + _WS + rb"\])|(?=\])))++\]"
    return re.compile(item)


def _check_nesting(span: bytes, depth: int) -> None:
    """Refuse a nested array whose numbers do not all sit ``depth`` arrays deep, or that closes
    before its end (``[[1]],[[2]]``): each innermost array becomes one ``a``, and what is left
    must be arrays nested ``depth - 1`` levels around those (a small text, checked in C)."""
    reduced = _INNERMOST.sub(b"a", span)
    if _nested(depth - 1).fullmatch(reduced) is None:
        raise ValueError(f"its numbers do not all sit {depth} arrays deep")


def parse_body(body: bytes, max_skeleton: int) -> Any:
    """Parse an inference request body; each input's numeric ``data`` array becomes a
    :class:`RawData`.

    Args:
        body: the request body.
        max_skeleton: most bytes of JSON outside the numeric ``data`` arrays (what becomes Python
            objects when parsed).

    Raises:
        BodyError: 400 for a body that is not JSON, 413 for a skeleton over ``max_skeleton``.
    """
    spans = [m.span(1) for m in _DATA.finditer(body)]
    skeleton = len(body) - sum(e - s for s, e in spans) + _PLACEHOLDER_BYTES * len(spans)
    if skeleton > max_skeleton:
        raise BodyError(
            413,
            f"the body holds {skeleton} bytes of JSON besides arrays of numbers; this server "
            f"takes at most {max_skeleton} (send tensor data as arrays of numbers)",
        )
    if not spans:
        return loads(body)
    nonce = secrets.token_hex(8)
    pieces: list[bytes] = []
    pos = 0
    for i, (s, e) in enumerate(spans):
        pieces += [body[pos:s], b'"%s:%d"' % (nonce.encode(), i)]
        pos = e
    pieces.append(body[pos:])
    doc = loads(b"".join(pieces))
    placed = 0
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    for inp in inputs if isinstance(inputs, list) else []:
        data = inp.get("data") if isinstance(inp, dict) else None
        if isinstance(data, str) and data.startswith(nonce + ":"):
            s, e = spans[int(data.rpartition(":")[2])]
            inp["data"] = RawData(body, s, e)
            placed += 1
    if placed != len(spans):  # a "data" key elsewhere (in parameters, a key ending in "data")
        if len(body) > max_skeleton:
            raise BodyError(
                413,
                f"the body has arrays under a 'data' key outside 'inputs'; such bodies may "
                f"have at most {max_skeleton} bytes",
            )
        return loads(body)
    return doc
