"""Property-based fuzzing of OIP v2 request decoding (runtime/oipjson.py, runtime/oip.py): any
body either becomes a checked request that the model runs, or is answered 400/413/422; nothing
else (an exception here is an HTTP 500 in the server). The fast parser of tensor data must give
exactly what a JSON parser followed by numpy gives."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _fuzz import fuzz
from _tiny import tiny_bundle
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgesmith.runtime.model import Model, load
from edgesmith.runtime.serve.oip import DATATYPES, ProtocolError, RequestLimits, decode_request
from edgesmith.runtime.serve.oipjson import BodyError, RawData, loads, parse_body

SKELETON = 64 << 10
LIMITS = RequestLimits(max_batch=8, max_decoded_bytes=1 << 20, max_prepared_bytes=4 << 20)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    root = tmp_path_factory.mktemp("tiny")
    return load(tiny_bundle(root / "b", root / "w"))


def _check(body: bytes, model: Model) -> None:
    """The property: a request the model runs, or a 400/413/422; nothing else. Both ways the
    server parses bodies: arrays of numbers kept out of Python objects (large bodies), and whole
    (small ones)."""
    _check_parsed(body, model, lambda b: parse_body(b, SKELETON))
    _check_parsed(body, model, loads)


def _check_parsed(body: bytes, model: Model, parse: Any) -> None:
    try:
        doc = parse(body)
    except BodyError as exc:
        assert exc.status in (400, 413), exc.status
        return
    try:
        req = decode_request(doc, model, LIMITS)
    except ProtocolError as exc:
        assert exc.status in (400, 413, 422) and exc.message, exc.status
        return
    assert 1 <= req.n <= LIMITS.max_batch
    outs = model.run_checked(req.arrays)
    assert outs[0].shape == (req.n, 3)


def _dumps(doc: Any, style: int) -> bytes:
    seps = [(",", ":"), (", ", ": "), (" ,\n", " :\t")][style % 3]
    return json.dumps(
        doc, separators=seps, allow_nan=True, indent=None if style < 3 else 1
    ).encode()


_numbers = st.one_of(
    st.integers(-300, 300),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-1e3, 1e3, width=32),
)
_json = st.recursive(
    st.none() | st.booleans() | _numbers | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


@st.composite
def _data_for(draw: st.DrawFn, shape: list[int]) -> Any:
    count = math.prod(shape) if shape else 1
    if draw(st.integers(0, 4)) == 0 or count > 4096:
        return draw(_json)
    if count <= 16:
        values = draw(st.lists(_numbers, min_size=count, max_size=count))
    else:  # many values: numpy makes them (hypothesis draws a few of them)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        kind = draw(st.sampled_from(["u8", "int", "float"]))
        arr = {
            "u8": lambda: rng.integers(0, 256, count),
            "int": lambda: rng.integers(-(2**40), 2**40, count),
            "float": lambda: rng.normal(0, 100, count),
        }[kind]()
        values = arr.tolist()
        for _ in range(draw(st.integers(0, 2))):
            values[draw(st.integers(0, count - 1))] = draw(_numbers)
    arr = np.asarray(values, dtype=object)
    if draw(st.booleans()) and shape:
        return arr.reshape(shape).tolist()
    return arr.tolist()


@st.composite
def _requests(draw: st.DrawFn) -> Any:
    shape = draw(
        st.one_of(
            st.lists(st.integers(0, 9), min_size=0, max_size=5),
            st.just([draw(st.integers(1, 8)), 1, 8, 8]),
            st.just(
                [draw(st.integers(0, 9)), draw(st.integers(1, 12)), draw(st.integers(1, 12)), 1]
            ),
            st.lists(st.integers(-2, 2**40) | st.booleans() | st.floats(), max_size=4),
        )
    )
    inp: dict[str, Any] = {
        "name": draw(st.sampled_from(["input", "input", "output", ""]) | st.text(max_size=4)),
        "shape": shape,
        "datatype": draw(st.sampled_from([*DATATYPES, "FP32", "UINT8", "BYTES", "fp32"])),
    }
    if all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 100 for d in shape):
        inp["data"] = draw(_data_for(shape))
    else:
        inp["data"] = draw(_json)
    for key in draw(st.sets(st.sampled_from(["name", "shape", "datatype", "data"]), max_size=1)):
        del inp[key]
    doc: dict[str, Any] = {"inputs": draw(st.sampled_from([[inp], [inp, inp], [inp, {}]]))}
    if draw(st.booleans()):
        doc["parameters"] = {
            "timeout": draw(st.one_of(_numbers, st.just(10**400), st.text(max_size=3)))
        }
    if draw(st.booleans()):
        doc["outputs"] = draw(st.sampled_from([[{"name": "output"}], [{"name": "x"}], "o", [1]]))
    if draw(st.booleans()):
        doc["id"] = draw(st.text(max_size=4) | st.integers())
    if draw(st.integers(0, 9)) == 0:
        return draw(_json)
    return doc


@fuzz(2.0)
@given(doc=_requests(), style=st.integers(0, 5))
def test_any_request_is_answered_or_refused_cleanly(model: Model, doc: Any, style: int) -> None:
    _check(_dumps(doc, style), model)


_VALID = {
    "inputs": [
        {"name": "input", "shape": [2, 4, 4, 1], "datatype": "UINT8", "data": list(range(32))},
    ],
    "parameters": {"timeout": 1000000},
}


@fuzz(3.0)
@given(
    base=st.sampled_from(
        [_VALID, {"inputs": [{**_VALID["inputs"][0], "data": [list(range(16))] * 2}]}]
    ),
    edits=st.lists(
        st.tuples(
            st.integers(0, 10**6),
            st.sampled_from(["flip", "insert", "delete"]),
            st.sampled_from(list(b'[]{},:"0123456789.eE+- tnaN')) | st.integers(0, 255),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_mutated_bodies_are_answered_or_refused_cleanly(
    model: Model, base: Any, edits: list[tuple[int, str, int]]
) -> None:
    body = bytearray(_dumps(base, 0))
    for pos, op, byte in edits:
        pos %= len(body) + 1
        if op == "insert":
            body.insert(pos, byte)
        elif body and pos < len(body):
            if op == "flip":
                body[pos] = byte
            else:
                del body[pos]
    _check(bytes(body), model)


_DTYPES = [
    "float32",
    "float64",
    "float16",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
]


@st.composite
def _arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5))
    elements = None
    if dtype.kind == "f":
        elements = st.floats(width=8 * dtype.itemsize, allow_nan=False, allow_infinity=False)
    return draw(hnp.arrays(dtype, shape, elements=elements))


@fuzz(3.0)
@given(arr=_arrays(), nested=st.booleans(), spaces=st.sampled_from(["", " ", "\n\t "]))
def test_fast_tensor_parser_matches_json_then_numpy(
    arr: np.ndarray, nested: bool, spaces: str
) -> None:
    data = arr.tolist() if nested else arr.ravel().tolist()
    text = json.dumps(data, separators=(spaces + "," + spaces, ":"))
    body = f'{{"inputs": [{{"name": "x", "shape": {list(arr.shape)}, "data":{spaces}{text}}}]}}'.encode()
    raw = parse_body(body, SKELETON)["inputs"][0]["data"]
    assert isinstance(raw, RawData)
    got = raw.decode(str(arr.dtype), list(arr.shape))
    want = np.asarray(json.loads(body)["inputs"][0]["data"], dtype=arr.dtype).reshape(arr.shape)
    assert got.dtype == arr.dtype and got.shape == arr.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, arr)


@fuzz(2.0)
@given(
    text=st.text(alphabet="[]0123456789,.eE+- \n", max_size=40),
    dtype=st.sampled_from([*_DTYPES, "bool"]),
    shape=st.lists(st.integers(0, 4), max_size=3),
)
def test_fast_tensor_parser_accepts_only_what_json_accepts(
    text: str, dtype: str, shape: list[int]
) -> None:
    body = b'{"inputs":[{"name":"x","data":' + text.encode() + b"}]}"
    try:
        doc = parse_body(body, SKELETON)
    except BodyError:
        return
    raw = doc["inputs"][0]["data"]
    assume(isinstance(raw, RawData))
    try:
        got = raw.decode(dtype, shape)
    except ValueError:
        return
    ref = json.loads(text)  # what the fast path took must be JSON ...
    assert isinstance(ref, list)
    assert got.size == math.prod(shape) and got.shape == tuple(shape)  # ... of the declared size
    np.testing.assert_array_equal(got.ravel(), np.asarray(_flatten(ref), dtype=dtype))


def _flatten(x: Any) -> list[Any]:
    return [v for item in x for v in _flatten(item)] if isinstance(x, list) else [x]


def test_parser_refusals_keep_the_server_side_bounded(tmp_path: Path) -> None:
    """Bodies whose non-tensor JSON is large are refused before they are parsed."""
    many_lists = (
        b'{"inputs":[{"name":"x","data":[true]}],"parameters":{"p":' + b"[[]," * 40000 + b"[]]}}"
    )
    with pytest.raises(BodyError) as info:
        parse_body(many_lists, SKELETON)
    assert info.value.status == 413
    # a data key outside inputs is parsed the plain way (small bodies only)
    doc = parse_body(b'{"inputs":[],"parameters":{"data":[1,2]}}', SKELETON)
    assert doc["parameters"]["data"] == [1, 2]
    with pytest.raises(BodyError) as info:
        parse_body(b'{"inputs":[],"parameters":{"data":[' + b"1," * 50000 + b"1]}}", SKELETON)
    assert info.value.status == 413
