"""The HTTP side of ``edgesmith serve``: the OIP v2 routes, authentication, body limits, decoding
off the event loop, and the hand-off to the model's micro-batcher.

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``,
``/v2/models/{name}[/versions/{v}]/ready``, ``POST /v2/models/{name}[/versions/{v}]/infer`` and
``GET /metrics`` (Prometheus). A full queue answers 503, a passed deadline 504, a body over the
limit 413, a missing or wrong bearer token 401 (the health endpoints need none), and bad input
400/422 with ``{"error": ...}`` while the server keeps serving.

A request's cost is bounded before its data is read: its declared shapes are checked first (samples
per batch, bytes as sent and once preprocessed; :class:`~edgesmith.runtime.serve.oip.RequestLimits`),
and its tensor data is parsed straight into numpy (:mod:`edgesmith.runtime.serve.oipjson`). Parsing,
preprocessing and large responses run in worker threads (small ones, whose whole cost is below
a thread hop, on the event loop), inference on the batcher's thread: health checks stay prompt
under attack.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from edgesmith import __version__
from edgesmith.runtime.model import Model
from edgesmith.runtime.serve.batching import BatcherClosed, DeadlineExceeded, Pending, QueueFull
from edgesmith.runtime.serve.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from edgesmith.runtime.serve.oip import (
    InferRequest,
    PlannedRequest,
    ProtocolError,
    encode_response,
    model_metadata,
    plan_request,
)
from edgesmith.runtime.serve.oipjson import BodyError, loads, parse_body

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
except ImportError:  # pragma: no cover - depends on the install
    from edgesmith.errors import EdgesmithError

    raise EdgesmithError(
        "edgesmith serve needs starlette and uvicorn", hint="pip install 'edgesmith[serve]'"
    ) from None


class Served(Protocol):
    """What the routes need of the server (:class:`~edgesmith.runtime.serve.server.Server`)."""

    config: Any  # ServeConfig
    metrics: ServerMetrics
    draining: bool

    @property
    def slot(self) -> Any: ...  # the Slot served now: model, batcher, limits

    def lifespan(self, app: Any) -> Any: ...


__all__ = ["App"]

log = logging.getLogger("edgesmith.runtime.serve")

# what the event loop does itself: bodies this small (when their tensors are small once
# preprocessed too) and responses with this few values; anything larger goes to a worker thread
_INLINE_BODY_BYTES = 32 << 10
_INLINE_OUTPUT_VALUES = 1 << 14


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # NaN/Inf outputs (possible only with nan_policy="allow") are written as NaN/Infinity literals,
    # as Python's json module and Triton do
    return Response(
        json.dumps(doc, separators=(",", ":")).encode(),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json({"error": message}, status, headers)


def _json_response(model: Model, req: InferRequest, result: list[np.ndarray]) -> Response:
    return _json(encode_response(model, req, result))


def _skeleton_limit(max_body_bytes: int) -> int:
    """Most bytes of a body outside its numeric tensor data: parsed into Python objects, which
    take up to ~25x their JSON size."""
    return max(16 << 10, min(1 << 20, max_body_bytes // 16))


class App:
    """The OIP v2 routes of one :class:`~edgesmith.runtime.serve.server.Server` (``App(server).build()``)."""

    def __init__(self, server: Served) -> None:
        self.server = server
        self.config = server.config
        self.metrics = server.metrics
        self._pool: ThreadPoolExecutor | None = None

    @property
    def _slot(self) -> Any:
        return self.server.slot

    def close(self) -> None:
        """Stop the decode threads (the server's shutdown)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _auth(self, request: Request) -> Response | None:
        token = self.config.token
        if not token:
            return None
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            return None
        return _error(
            401,
            "missing or wrong bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="edgesmith"'},
        )

    def _find(self, request: Request) -> tuple[Any, Response | None]:
        slot = self._slot
        assert slot is not None
        name = request.path_params["name"]
        version = request.path_params.get("version")
        if name != slot.model.name:
            return None, _error(
                404, f"unknown model '{name}'; this server serves '{slot.model.name}'"
            )
        if version is not None and version != str(slot.model.version):
            return None, _error(
                404,
                f"model '{name}' version {version} is not served (serving {slot.model.version})",
            )
        return slot, None

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ProtocolError(400, "the Content-Length header is not a number")
            if int(declared) > limit:
                raise ProtocolError(
                    413, f"the body has {declared} bytes; this server takes at most {limit}"
                )
        chunks: list[bytes] = []

        async def read() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ProtocolError(413, f"the body is over {limit} bytes, this server's limit")
                chunks.append(chunk)

        # a client that trickles its body would otherwise hold a connection and its buffer for ever
        deadline = self.config.body_timeout_s
        try:
            await asyncio.wait_for(read(), deadline)
        except asyncio.TimeoutError:
            raise ProtocolError(
                408, f"the request body did not arrive within {deadline:g} s; send it faster"
            ) from None
        return b"".join(chunks)

    def _plan(self, body: bytes) -> tuple[Any, PlannedRequest]:
        """Parse a body and check it, from its declared shapes, against the model served now.

        A small body is parsed whole (its Python objects take at most ~25x its size, and orjson
        alone is the fastest way); a larger one keeps its arrays of numbers out of Python objects
        (:func:`~edgesmith.runtime.serve.oipjson.parse_body`)."""
        try:
            if len(body) <= _INLINE_BODY_BYTES:
                doc = loads(body)
            else:
                doc = parse_body(body, _skeleton_limit(self.config.max_body_bytes))
        except BodyError as exc:
            raise ProtocolError(exc.status, exc.message) from None
        assert self._slot is not None
        slot = self._slot
        return slot, plan_request(doc, slot.model, slot.limits)

    def _decode(self, body: bytes) -> tuple[Any, InferRequest]:
        """Parse, check, read and preprocess a request (in a worker thread)."""
        slot, planned = self._plan(body)
        return slot, planned.finish()

    async def _decode_off_loop(self, body: bytes) -> tuple[Any, InferRequest]:
        """:meth:`_decode`, in a worker thread unless the whole job is small: a small body whose
        tensors are small once preprocessed costs less than the hop to a thread."""
        if len(body) > _INLINE_BODY_BYTES:
            result: tuple[Any, InferRequest] = await self._offload(self._decode, body)
            return result
        slot, planned = self._plan(body)
        return slot, planned.finish() if planned.cheap else await self._offload(planned.finish)

    async def _offload(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                self.config.decode_threads, thread_name_prefix="edgesmith-decode"
            )
        return await loop.run_in_executor(self._pool, fn, *args)

    async def _infer(self, request: Request) -> Response:
        denied = self._auth(request)
        if denied is not None:
            return denied
        slot, missing = self._find(request)
        if missing is not None:
            return missing
        body = await self._read_body(request)
        loop = asyncio.get_running_loop()
        for _ in range(3):  # a swap between decode and submit: decode again for the new model
            slot, req = await self._decode_off_loop(body)
            timeout = req.timeout_s if req.timeout_s is not None else self.config.timeout_ms / 1e3
            fut: asyncio.Future[list[np.ndarray]] = loop.create_future()
            item = Pending(req.arrays, req.n, time.monotonic() + timeout, fut)
            try:
                slot.batcher.submit(item)
                break
            except BatcherClosed:
                continue
            except QueueFull:
                return _error(
                    503,
                    f"the queue is full ({self.config.max_queue} requests waiting); retry later",
                    headers={"Retry-After": "1"},
                )
        else:
            return _error(503, "the model is being replaced; retry", headers={"Retry-After": "1"})
        del body  # the request's arrays are all that is needed from here on
        timer = loop.call_later(timeout, _expire, fut, item)
        try:
            result = await fut
        except DeadlineExceeded:
            return _error(
                504, f"the request did not finish within its deadline ({timeout * 1e3:.0f} ms)"
            )
        finally:
            timer.cancel()
        if sum(r.size for r in result) > _INLINE_OUTPUT_VALUES:
            return await self._offload(_json_response, slot.model, req, result)
        return _json_response(slot.model, req, result)

    async def _handle(self, endpoint: str, request: Request, fn: Any) -> Response:
        t0 = time.perf_counter()
        self.metrics.inflight.inc()
        try:
            resp = await fn(request)
        except ProtocolError as exc:
            resp = _error(exc.status, exc.message)
        except Exception as exc:
            log.exception("%s failed", endpoint)
            resp = _error(500, f"internal error: {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            self.metrics.inflight.dec()
        self.metrics.observe_request(endpoint, resp.status_code, time.perf_counter() - t0)
        return resp

    def build(self) -> Starlette:
        """The Starlette application (its lifespan is the server's)."""

        async def infer(request: Request) -> Response:
            return await self._handle("infer", request, self._infer)

        async def live(request: Request) -> Response:
            return _json({"live": True})

        async def ready(request: Request) -> Response:
            ok = self._slot is not None and not self.server.draining
            return _json({"ready": ok}, 200 if ok else 503)

        async def server_meta(request: Request) -> Response:
            return self._auth(request) or _json(
                {"name": "edgesmith", "version": __version__, "extensions": []}
            )

        async def model_meta(request: Request) -> Response:
            denied = self._auth(request)
            if denied is not None:
                return denied
            slot, missing = self._find(request)
            if missing is not None:
                return missing
            assert slot is not None
            return _json(model_metadata(slot.model))

        async def model_ready(request: Request) -> Response:
            denied = self._auth(request)
            if denied is not None:
                return denied
            slot, missing = self._find(request)
            if missing is not None:
                return missing
            assert slot is not None
            return _json({"name": slot.model.name, "ready": not self.server.draining})

        async def metrics(request: Request) -> Response:
            denied = self._auth(request)
            if denied is not None:
                return denied
            return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

        async def not_found(request: Request, exc: Exception) -> Response:
            status = getattr(exc, "status_code", 404)
            return _error(
                status,
                f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}",
            )

        routes = [
            Route("/v2", server_meta, methods=["GET"]),
            Route("/v2/health/live", live, methods=["GET"]),
            Route("/v2/health/ready", ready, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            routes += [
                Route(prefix, model_meta, methods=["GET"]),
                Route(prefix + "/ready", model_ready, methods=["GET"]),
                Route(prefix + "/infer", infer, methods=["POST"]),
            ]
        return Starlette(
            routes=routes,
            lifespan=self.server.lifespan,
            exception_handlers={HTTPException: not_found},
        )


def _expire(fut: asyncio.Future[Any], item: Pending) -> None:
    if not fut.done():
        item.cancelled = True
        fut.set_exception(DeadlineExceeded())
