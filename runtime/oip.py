"""The Open Inference Protocol v2 (KServe/Triton REST) JSON codec, numpy only.

Status codes used by the server: 400 for a body that is not a valid inference request (malformed
JSON, missing fields, data that does not fill its shape), 422 for a valid request the model cannot
take (unknown input, wrong datatype or shape, NaN/Inf under ``nan_policy="error"``, too many
samples), 413 for a body over the size limit. Errors are ``{"error": "<message>"}`` as the
protocol specifies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgesmith.errors import InputError
from edgesmith.runtime.model import Model
from edgesmith.runtime.specs import TensorSpec, check_shared_dims

__all__ = [
    "DATATYPES",
    "InferRequest",
    "ProtocolError",
    "decode_request",
    "encode_response",
    "model_metadata",
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


def _decode_tensor(inp: Any, spec: TensorSpec, model: Model) -> np.ndarray:
    if not isinstance(inp, dict):
        raise _bad("each entry of 'inputs' must be an object with name, shape, datatype and data")
    for key in ("shape", "datatype", "data"):
        if key not in inp:
            raise _bad(f"input '{spec.name}' has no '{key}'")
    shape = inp["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _bad(f"input '{spec.name}': 'shape' must be a list of non-negative integers")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise ProtocolError(
            413, f"input '{spec.name}' has {count} elements; the limit is {MAX_ELEMENTS}"
        )
    datatype = inp["datatype"]
    if datatype not in DATATYPES:
        raise _bad(
            f"input '{spec.name}': unknown datatype {datatype!r}; use one of {', '.join(DATATYPES)}"
        )
    dtype = DATATYPES[datatype]
    images = (
        dtype == "uint8"
        and spec.dtype != "uint8"
        and bool(model.manifest and model.manifest.preprocess)
    )
    if dtype != spec.dtype and not images:
        raise ProtocolError(
            422,
            f"input '{spec.name}' has datatype {datatype}, the model takes {oip_datatype(spec.dtype)}",
        )
    data = inp["data"]
    if not isinstance(data, list):
        raise _bad(f"input '{spec.name}': 'data' must be a JSON array")
    try:
        arr = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise _bad(
            f"input '{spec.name}': 'data' is not a rectangular array of {datatype} numbers ({str(exc)[:120]})"
        ) from None
    if arr.size != count:
        raise _bad(
            f"input '{spec.name}': 'data' holds {arr.size} values but shape {shape} needs {count}"
        )
    return arr.reshape(shape)


def decode_request(doc: Any, model: Model, max_batch: int) -> InferRequest:
    """Check a parsed inference request against ``model`` and turn it into arrays.

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
            raise _bad(f"input '{name}' is given twice")
        by_name[name] = inp
    wanted = [s.name for s in model.inputs]
    if set(by_name) != set(wanted):
        raise ProtocolError(
            422, f"inputs given: {sorted(by_name)}; model '{model.name}' takes {sorted(wanted)}"
        )
    arrays = []
    for spec in model.inputs:
        arr = _decode_tensor(by_name[spec.name], spec, model)
        try:
            arrays.append(model.prepare(arr, spec))
        except InputError as exc:
            raise ProtocolError(422, exc.message) from None
    try:
        check_shared_dims(arrays, model.inputs, model.input_rules)
    except InputError as exc:
        raise ProtocolError(422, exc.message) from None
    n = int(arrays[0].shape[0]) if arrays[0].ndim else 1
    if model.batchable and n > max_batch:
        raise ProtocolError(
            422,
            f"the request holds {n} samples; this server runs at most {max_batch} per batch "
            "(split the request, or start the server with a larger --max-batch)",
        )
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
                422, f"unknown output(s) {unknown}; model '{model.name}' has {sorted(known)}"
            )
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("'parameters' must be an object")
    timeout_s = None
    if "timeout" in params:  # Triton's convention: microseconds
        t = params["timeout"]
        if not isinstance(t, int | float) or isinstance(t, bool) or t < 0:
            raise _bad("parameter 'timeout' must be a non-negative number of microseconds")
        timeout_s = float(t) / 1e6 if t else None
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise _bad("'id' must be a string")
    return InferRequest(arrays, n, rid, outputs, timeout_s)


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
