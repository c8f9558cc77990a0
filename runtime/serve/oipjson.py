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
_DATA_KEY = re.compile(rb'"data"' + _WS + rb":" + _WS + rb"\[")
_NUMBERS = b"-+.,0123456789eE \t\r\n"  # an array of numbers is written with these and brackets
_EMPTY = re.compile(rb"\[" + _WS + rb"\]")
_BRACKETS = bytes.maketrans(b"[]", b"  ")
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

    __slots__ = ("_body", "_brackets", "_end", "_start")

    def __init__(self, body: bytes, start: int, end: int, brackets: bytes) -> None:
        self._body, self._start, self._end, self._brackets = body, start, end, brackets

    @property
    def nbytes(self) -> int:
        """Bytes of JSON text."""
        return self._end - self._start

    def decode(self, dtype: str, shape: list[int]) -> np.ndarray:
        """The numbers of the array, in row-major order, as an array of ``dtype`` and ``shape``.

        The array may be flat or nested up to :data:`MAX_DEPTH` levels; as in Triton, the
        nesting is not checked against the shape, only the total count. Integer datatypes take
        JSON integers within their range only.

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
        if self._brackets == b"[]":
            text = body[s + 1 : e - 1]  # flat
        else:  # numbers may nest unevenly ([1, [2]]): only the total count matters, as in Triton
            _check_brackets(self._brackets)
            text = body[s:e].translate(_BRACKETS)  # orjson then checks the commas between numbers
        lo_hi = _INT_RANGE.get(dtype)
        out = np.empty(count, dtype)
        filled = _fill(out, text, lo_hi)
        if filled != count:
            raise ValueError(f"it holds {filled} values but shape {list(shape)} needs {count}")
        return out.reshape(shape)


def _fill(out: np.ndarray, text: bytes, lo_hi: tuple[int, int] | None) -> int:
    """Parse the comma-separated numbers of ``text`` into ``out``, one slice at a time."""
    pos, i, n = 0, 0, len(text)
    while pos < n:
        end = text.find(b",", pos + _SLICE)
        end = n if end < 0 else end
        part = b"[" + text[pos:end] + b"]"
        pos = end + 1
        values = orjson.loads(part) if orjson is not None else json.loads(part)
        if i + len(values) > out.size:
            raise ValueError(f"it holds more than the {out.size} values of its shape")
        if lo_hi is not None:
            # orjson reads integers beyond 64 bits as floats: those are refused here too
            arr = np.array(values)
            if arr.dtype.kind not in "iu":  # a float, or int64 and uint64 values together
                if not all(type(v) is int for v in values):
                    raise ValueError(
                        f"{out.dtype} data must be integers in [{lo_hi[0]}, {lo_hi[1]}]"
                    )
                arr = np.array(values, dtype=object)
            if arr.size and (int(arr.min()) < lo_hi[0] or int(arr.max()) > lo_hi[1]):
                raise ValueError(
                    f"a value is out of the {out.dtype} range [{lo_hi[0]}, {lo_hi[1]}]"
                )
            out[i : i + arr.size] = arr
        else:
            out[i : i + len(values)] = values
        i += len(values)
    return i


def _check_brackets(brackets: bytes) -> None:
    """Refuse an array whose brackets do not balance, that closes before its end (``[1],[2]``)
    or that nests deeper than :data:`MAX_DEPTH`, from its brackets alone, a slice at a time."""
    level = 0
    for a in range(0, len(brackets), _SLICE):
        b = np.frombuffer(brackets, np.uint8, min(_SLICE, len(brackets) - a), a)
        d = np.cumsum((b == 91).astype(np.int32) * 2 - 1, dtype=np.int32)  # '[' +1, ']' -1
        d += level
        last = a + b.size == len(brackets)
        if (d[:-1] if last else d).min(initial=1) <= 0 or d.max() > MAX_DEPTH:
            raise ValueError(f"it is not one array of arrays at most {MAX_DEPTH} deep")
        level = int(d[-1])
    if level != 0:
        raise ValueError("its brackets do not balance")


def _numeric_arrays(body: bytes) -> list[tuple[int, int, bytes]]:
    """(start, end, its brackets) of each array of numbers that is the value of a "data" key.

    After a value in an object comes ``,`` and the next key's ``"``, or ``}``: the array ends at
    the last ``]`` before the first ``"`` or ``}`` that follows it (found with ``bytes.find``,
    in C). An array holding anything but numbers (``true``, ``NaN``, strings) is left alone.
    """
    spans = []
    pos = 0
    while (key := body.find(b'"data"', pos)) >= 0:
        m = _DATA_KEY.match(body, key)
        pos = key + 6
        if m is None:
            continue
        start = m.end() - 1
        quote, brace = body.find(b'"', start), body.find(b"}", start)
        stop = min(x for x in (quote, brace, len(body)) if x >= 0)
        end = body.rfind(b"]", start, stop) + 1
        brackets = body[start:end].translate(None, _NUMBERS)
        if end > start and not brackets.translate(None, b"[]"):
            spans.append((start, end, brackets))
            pos = end
    return spans


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
    spans = _numeric_arrays(body)
    skeleton = len(body) - sum(e - s for s, e, _ in spans) + _PLACEHOLDER_BYTES * len(spans)
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
    for i, (s, e, _) in enumerate(spans):
        pieces += [body[pos:s], b'"%s:%d"' % (nonce.encode(), i)]
        pos = e
    pieces.append(body[pos:])
    doc = loads(b"".join(pieces))
    placed = 0
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    for inp in inputs if isinstance(inputs, list) else []:
        data = inp.get("data") if isinstance(inp, dict) else None
        if isinstance(data, str) and data.startswith(nonce + ":"):
            inp["data"] = RawData(body, *spans[int(data.rpartition(":")[2])])
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
