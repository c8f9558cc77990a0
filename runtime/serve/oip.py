"""The Open Inference Protocol v2 (KServe/Triton REST) JSON codec, numpy only.

Status codes used by the server: 400 for a body that is not a valid inference request (malformed
JSON, missing fields, data that does not fill its shape), 422 for a valid request the model cannot
take (unknown input, wrong datatype or shape, NaN/Inf under ``nan_policy="error"``, too many
samples), 413 for a body over the size limit. Errors are ``{"error": "<message>"}`` as the
protocol specifies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgesmith.errors import InputError
from edgesmith.runtime.model import Model
from edgesmith.runtime.serve.oipjson import MAX_DEPTH, RawData
from edgesmith.runtime.specs import TensorSpec, check_shared_dims, preprocessed_shape
from edgesmith.text import printable

__all__ = [
    "DATATYPES",
    "InferRequest",
    "PlannedRequest",
    "ProtocolError",
    "RequestLimits",
    "decode_request",
    "encode_response",
    "model_metadata",
    "plan_request",
]

# OIP datatype -> numpy dtype name
DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_OIP = {v: k for k, v in DATATYPES.items()}
MAX_ELEMENTS = 1 << 28
MAX_DIMS = MAX_DEPTH
MAX_TIMEOUT_US = 86_400e6  # one day
CHEAP_BYTES = 64 << 10  # tensors this small once preprocessed: light work to finish


class ProtocolError(Exception):
    """A request the server answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class InferRequest:
    """A decoded, checked inference request: arrays in model input order, sample count, options."""

    __slots__ = ("arrays", "id", "n", "outputs", "timeout_s")

    def __init__(
        self,
        arrays: list[np.ndarray],
        n: int,
        request_id: str | None,
        outputs: list[str] | None,
        timeout_s: float | None,
    ) -> None:
        self.arrays = arrays
        self.n = n
        self.id = request_id
        self.outputs = outputs
        self.timeout_s = timeout_s


def oip_datatype(dtype: str) -> str:
    return _OIP.get(dtype, dtype.upper())


def _meta_tensor(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "datatype": oip_datatype(spec.dtype),
        "shape": [d if isinstance(d, int) else -1 for d in spec.shape],
    }


def model_metadata(model: Model) -> dict[str, Any]:
    """The model metadata response object."""
    doc: dict[str, Any] = {
        "name": model.name,
        "platform": f"edgesmith_{model.info.get('backend')}",
        "inputs": [_meta_tensor(s) for s in model.inputs],
        "outputs": [_meta_tensor(s) for s in model.outputs],
        "parameters": {
            "provider": model.info.get("provider"),
            "precision": model.info.get("precision"),
        },
    }
    if model.version is not None:
        doc["versions"] = [str(model.version)]
    if model.labels:
        doc["parameters"]["labels"] = model.labels
    return doc


def _bad(message: str) -> ProtocolError:
    return ProtocolError(400, message)


@dataclass(frozen=True)
class RequestLimits:
    """What one request may cost, checked from its declared shapes before any data is read.

    Attributes:
        max_batch: most samples (dimension 0) per request.
        max_decoded_bytes: most bytes of all its tensors as sent (elements x datatype size).
        max_prepared_bytes: most bytes of all its tensors as the model takes them (after images
            are resized and converted); None: ``max_decoded_bytes``.
    """

    max_batch: int
    max_decoded_bytes: int = 1 << 30
    max_prepared_bytes: int | None = None


@dataclass
class _Plan:
    """One input of a request, checked from its declared shape and datatype alone."""

    spec: TensorSpec
    shape: list[int]
    dtype: str
    count: int
    samples: int
    decoded: int
    prepared: int
    images: bool


def _plan(inp: Any, spec: TensorSpec, model: Model) -> _Plan:
    if not isinstance(inp, dict):
        raise _bad("each entry of 'inputs' must be an object with name, shape, datatype and data")
    for key in ("shape", "datatype", "data"):
        if key not in inp:
            raise _bad(f"input '{printable(spec.name)}' has no '{key}'")
    shape = inp["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise _bad(
            f"input '{printable(spec.name)}': 'shape' must be a list of at most {MAX_DIMS} "
            "non-negative integers"
        )
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise ProtocolError(
            413, f"input '{printable(spec.name)}' has {count} elements; the limit is {MAX_ELEMENTS}"
        )
    datatype = inp["datatype"]
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise _bad(
            f"input '{printable(spec.name)}': unknown datatype {printable(repr(datatype))[:40]}; "
            f"use one of {', '.join(DATATYPES)}"
        )
    dtype = DATATYPES[datatype]
    pre = model.manifest.preprocess if model.manifest else None
    images = dtype == "uint8" and spec.dtype != "uint8" and bool(pre)
    if dtype != spec.dtype and not images:
        raise ProtocolError(
            422,
            f"input '{printable(spec.name)}' has datatype {datatype}, the model takes "
            f"{oip_datatype(spec.dtype)}",
        )
    decoded = count * np.dtype(dtype).itemsize
    if images:
        assert pre is not None
        nchw = preprocessed_shape(shape, pre)
        if nchw is None:
            raise ProtocolError(
                422,
                f"input '{printable(spec.name)}': images of shape {shape}; expected [N, H, W, C] "
                "(or [H, W, C]) with 1 or 3 channels",
            )
        n, c, h, w = nchw
        final = (n, c, h, w) if pre.get("layout", "NCHW") == "NCHW" else (n, h, w, c)
        if not spec.accepts_shape(final):
            raise ProtocolError(
                422,
                f"input '{printable(spec.name)}': images of shape {shape} preprocess to "
                f"{list(final)}; the model takes {list(spec.shape)}",
            )
        # the resized uint8 images, their float copy and the model's input
        prepared = n * h * w * c * (1 + 4) + math.prod(final) * spec.np_dtype.itemsize
        samples = n
    else:
        if not spec.accepts_shape(tuple(shape)):
            raise ProtocolError(
                422,
                f"input '{printable(spec.name)}' has shape {shape}, the model takes "
                f"{list(spec.shape)}",
            )
        prepared = decoded
        samples = shape[0] if shape else 1
    return _Plan(spec, shape, dtype, count, samples, decoded, prepared, images)


def _decode_data(plan: _Plan, data: Any) -> np.ndarray:
    name, datatype = printable(plan.spec.name), oip_datatype(plan.dtype)
    if isinstance(data, RawData):
        try:
            return data.decode(plan.dtype, plan.shape)
        except ValueError as exc:
            raise _bad(
                f"input '{name}': 'data' is not a rectangular array of {plan.count} {datatype} "
                f"values ({printable(str(exc))[:160]})"
            ) from None
    if not isinstance(data, list):
        raise _bad(f"input '{name}': 'data' must be a JSON array")
    kind = np.dtype(plan.dtype).kind
    try:
        # floats: straight to the datatype (one pass); integers and booleans: as parsed, so that
        # floats, out-of-range values and mixed kinds can be told apart
        arr = np.asarray(data, dtype=plan.dtype if kind == "f" else None)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise _bad(
            f"input '{name}': 'data' is not a rectangular array of {datatype} values "
            f"({printable(str(exc))[:120]})"
        ) from None
    kinds = {"b": "b", "i": "iu", "u": "iu", "f": "f"}[kind]
    if arr.size and arr.dtype.kind not in kinds:
        raise _bad(f"input '{name}': 'data' holds values that are not {datatype}")
    if arr.size != plan.count:
        raise _bad(
            f"input '{name}': 'data' holds {arr.size} values but shape {plan.shape} needs "
            f"{plan.count}"
        )
    if kind in "iu" and arr.size:
        info = np.iinfo(plan.dtype)
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            raise _bad(f"input '{name}': a value is out of the {datatype} range")
    try:
        return arr.astype(plan.dtype, copy=False).reshape(plan.shape)
    except (ValueError, TypeError, OverflowError) as exc:  # pragma: no cover - checked above
        raise _bad(f"input '{name}': {printable(str(exc))[:120]}") from None


def _options(
    doc: dict[str, Any], model: Model
) -> tuple[list[str] | None, float | None, str | None]:
    outputs = None
    if doc.get("outputs") is not None:
        req_out = doc["outputs"]
        if not isinstance(req_out, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in req_out
        ):
            raise _bad("'outputs' must be a list of objects with a 'name'")
        outputs = [o["name"] for o in req_out]
        known = {s.name for s in model.outputs}
        unknown = [o for o in outputs if o not in known]
        if unknown:
            raise ProtocolError(
                422,
                f"unknown output(s) {printable(unknown)[:200]}; model '{model.name}' has "
                f"{printable(sorted(known))}",
            )
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("'parameters' must be an object")
    timeout_s = None
    if "timeout" in params:  # Triton's convention: microseconds
        t = params["timeout"]
        if (
            not isinstance(t, int | float)
            or isinstance(t, bool)
            or not 0 <= t <= MAX_TIMEOUT_US  # also NaN and 1e400 (inf), and 10**400 (an int)
        ):
            raise _bad(
                "parameter 'timeout' must be a number of microseconds from 0 to "
                f"{MAX_TIMEOUT_US:.0f}"
            )
        timeout_s = float(t) / 1e6 if t else None
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise _bad("'id' must be a string")
    return outputs, timeout_s, rid


class PlannedRequest:
    """A request checked from its declared shapes and datatypes; :meth:`finish` reads its data.

    ``cheap`` says that finishing it is light work (its tensors are small once preprocessed):
    with a small body, the server may do that on its event loop instead of a worker thread.
    """

    __slots__ = ("_data", "_model", "_plans", "id", "n", "outputs", "prepared", "timeout_s")

    def __init__(
        self,
        model: Model,
        plans: list[_Plan],
        data: list[Any],
        n: int,
        options: tuple[list[str] | None, float | None, str | None],
    ) -> None:
        self._model, self._plans, self._data, self.n = model, plans, data, n
        self.outputs, self.timeout_s, self.id = options
        self.prepared = sum(p.prepared for p in plans)

    @property
    def cheap(self) -> bool:
        return self.prepared <= CHEAP_BYTES

    def finish(self) -> InferRequest:
        """Read the tensors' numbers and preprocess them.

        Raises:
            ProtocolError: 400 for data that does not fill its shape, 422 for values the model
                refuses (NaN/Inf, images of the wrong size).
        """
        arrays = []
        for plan, data in zip(self._plans, self._data, strict=True):
            arr = _decode_data(plan, data)
            try:
                arrays.append(self._model.prepare(arr, plan.spec))
            except InputError as exc:
                raise ProtocolError(422, printable(exc.message)) from None
        try:
            check_shared_dims(arrays, self._model.inputs, self._model.input_rules)
        except InputError as exc:
            raise ProtocolError(422, printable(exc.message)) from None
        n = int(arrays[0].shape[0]) if arrays[0].ndim else 1
        return InferRequest(arrays, n, self.id, self.outputs, self.timeout_s)


def plan_request(doc: Any, model: Model, limits: RequestLimits) -> PlannedRequest:
    """Check a parsed request from its declared shapes and datatypes alone, before any of its
    data is read: inputs' names, shapes and datatypes, options, the sample count (first), then
    the bytes its tensors take as sent and once preprocessed.

    Raises:
        ProtocolError: 400 (not an inference request), 422 (not for this model), 413 (too big).
    """
    if not isinstance(doc, dict):
        raise _bad("the body must be a JSON object with an 'inputs' array")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("the request has no 'inputs' array")
    by_name: dict[str, Any] = {}
    for inp in inputs:
        name = inp.get("name") if isinstance(inp, dict) else None
        if not isinstance(name, str):
            raise _bad("each input needs a 'name' string")
        if name in by_name:
            raise _bad(f"input '{printable(name)[:80]}' is given twice")
        by_name[name] = inp
    wanted = [s.name for s in model.inputs]
    aliases = getattr(model, "input_aliases", None) or {}
    if aliases and set(by_name) != set(wanted):  # the recipe's names (manifest "alias")
        by_name = {aliases.get(k, k): v for k, v in by_name.items()}
    if set(by_name) != set(wanted):
        raise ProtocolError(
            422,
            f"inputs given: {printable(sorted(by_name))[:200]}; model '{model.name}' takes "
            f"{printable(sorted(wanted))}",
        )
    options = _options(doc, model)
    plans = [_plan(by_name[spec.name], spec, model) for spec in model.inputs]
    n = plans[0].samples
    if model.batchable and n > limits.max_batch:
        raise ProtocolError(
            422,
            f"the request holds {n} samples; this server runs at most {limits.max_batch} per "
            "batch (split the request, or start the server with a larger --max-batch)",
        )
    if model.batchable and n == 0:
        raise ProtocolError(422, "the request holds no samples")
    decoded = sum(p.decoded for p in plans)
    if decoded > limits.max_decoded_bytes:
        raise ProtocolError(
            413,
            f"the request's tensors take {decoded} bytes; this server takes at most "
            f"{limits.max_decoded_bytes} per request (split it)",
        )
    planned = PlannedRequest(
        model, plans, [by_name[p.spec.name]["data"] for p in plans], n, options
    )
    max_prepared = limits.max_prepared_bytes or limits.max_decoded_bytes
    if planned.prepared > max_prepared:
        raise ProtocolError(
            413,
            f"the request's tensors take {planned.prepared} bytes once preprocessed; this "
            f"server takes at most {max_prepared} per request (split it)",
        )
    return planned


def decode_request(doc: Any, model: Model, max_batch: int | RequestLimits) -> InferRequest:
    """Check a parsed inference request against ``model`` and turn it into arrays.

    Everything that can be judged from the declared shapes and datatypes is checked first
    (:func:`plan_request`); only then are the numbers read (``data`` is a list, or a
    :class:`~edgesmith.runtime.serve.oipjson.RawData` from :func:`~edgesmith.runtime.serve.oipjson.parse_body`)
    and images preprocessed.

    Args:
        doc: the parsed body.
        model: the model the request is for.
        max_batch: most samples per request, or all the limits (:class:`RequestLimits`).

    Raises:
        ProtocolError: 400 (not an inference request), 422 (not for this model), 413 (too big).
    """
    limits = max_batch if isinstance(max_batch, RequestLimits) else RequestLimits(max_batch)
    return plan_request(doc, model, limits).finish()


def encode_response(
    model: Model, request: InferRequest, results: list[np.ndarray]
) -> dict[str, Any]:
    """The inference response object for ``results`` (one array per model output)."""
    outs = []
    for spec, arr in zip(model.outputs, results, strict=True):
        if request.outputs is not None and spec.name not in request.outputs:
            continue
        outs.append(
            {
                "name": spec.name,
                "shape": list(arr.shape),
                "datatype": oip_datatype(str(arr.dtype)),
                "data": arr.reshape(-1).tolist(),
            }
        )
    doc: dict[str, Any] = {"model_name": model.name, "outputs": outs}
    if model.version is not None:
        doc["model_version"] = str(model.version)
    if request.id is not None:
        doc["id"] = request.id
    return doc
