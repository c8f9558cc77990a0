"""``edgesmith serve``: a model server speaking the Open Inference Protocol v2 (KServe/Triton REST).

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``,
``/v2/models/{name}[/versions/{v}]/ready``, ``POST /v2/models/{name}[/versions/{v}]/infer`` and
``GET /metrics`` (Prometheus). Requests run through a :class:`MicroBatcher`; a full queue answers
503, a passed deadline 504, a body over the limit 413, a missing or wrong bearer token 401 (the
health endpoints need none), and bad input 400/422 with ``{"error": ...}`` while the server keeps
serving. SIGTERM stops accepting connections, lets the requests in flight finish, then exits 0.

Hot swap: :meth:`Server.swap` loads a new model (bundles are verified), checks it on its golden
inputs, and switches to it between two batches; requests already queued finish on the old model,
so none fails. With ``watch`` the server re-resolves its path (a bundle folder, a model file, or a
symbolic link such as the OTA agent's ``current``) every ``watch_interval_s`` and swaps when the
resolved target or the manifest's version changes; a model that fails to load or check is logged
and the old one keeps serving.

Built on Starlette and uvicorn (the ``serve`` extra): the ASGI toolkit under FastAPI, without
FastAPI's request models, because bodies must be size-capped before they are parsed and OIP
tensors are checked against the model, not against a static schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgesmith import __version__
from edgesmith.errors import CheckFailed, EdgesmithError
from edgesmith.runtime.batching import (
    BatcherClosed,
    DeadlineExceeded,
    MicroBatcher,
    Pending,
    QueueFull,
)
from edgesmith.runtime.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from edgesmith.runtime.model import Model, load
from edgesmith.runtime.oip import ProtocolError, decode_request, encode_response, model_metadata
from edgesmith.runtime.outputs import compare_golden_outputs, golden_arrays

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
except ImportError:  # pragma: no cover - depends on the install
    raise EdgesmithError(
        "edgesmith serve needs starlette and uvicorn", hint="pip install 'edgesmith[serve]'"
    ) from None

__all__ = ["ServeConfig", "Server"]

log = logging.getLogger(__name__)

try:  # orjson parses request bodies ~8x faster than json: a fifth of the CPU per request here
    import orjson
except ImportError:  # pragma: no cover - depends on the install
    orjson = None  # type: ignore[assignment]


def _loads(body: bytes) -> Any:
    if orjson is not None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:  # NaN/Infinity literals (json takes them), or an error
            pass
    return json.loads(body)


class ServeConfig(BaseModel):
    """Options of :class:`Server` (and of ``edgesmith serve``)."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_batch: int = Field(
        default=32, ge=1, le=4096, description="most samples per batch; 1 disables batching"
    )
    max_wait_ms: float = Field(
        default=2.0, ge=0, le=60_000, description="how long a batch waits to fill"
    )
    max_queue: int = Field(default=256, ge=1, description="requests waiting before 503")
    timeout_ms: float = Field(
        default=10_000, gt=0, description="default per-request deadline (504)"
    )
    max_body_bytes: int = Field(default=8 << 20, ge=1024, description="request body limit (413)")
    max_connections: int = Field(default=256, ge=1, description="concurrent connections before 503")
    token: str | None = Field(default=None, repr=False, description="bearer token required if set")
    nan_policy: Literal["error", "allow"] = "error"
    watch: bool = False
    watch_interval_s: float = Field(default=1.0, gt=0)
    device: str = "auto"
    threads: int | None = Field(default=None, ge=1)
    backend: str | None = None
    drain_timeout_s: float = Field(default=30.0, ge=0)
    self_check: bool = True
    inference_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="nice value added to the inference thread: requests are read and shed first",
    )


@dataclass
class _Slot:
    model: Model
    batcher: MicroBatcher
    source: str
    fingerprint: tuple[Any, ...]


def _fingerprint(path: Path) -> tuple[Any, ...]:
    """What identifies the model behind ``path``: its resolved target and version (or file stat)."""
    real = os.path.realpath(path)
    if os.path.isdir(real):
        manifest = os.path.join(real, "manifest.json")
        st = os.stat(manifest)
        version = None
        with contextlib.suppress(OSError, ValueError, AttributeError), open(manifest, "rb") as f:
            version = json.loads(f.read(1 << 22)).get("version")
        return (real, version, st.st_mtime_ns, st.st_size)
    st = os.stat(real)
    return (real, None, st.st_mtime_ns, st.st_size, st.st_ino)


def _self_check(model: Model, root: Path) -> None:
    """Run a new model once before it serves: on the bundle's golden inputs when it has them."""
    golden = model.manifest.golden if model.manifest else None
    if golden and golden.get("file") and root.is_dir():
        names = [s.name for s in model.outputs]
        try:
            with np.load(root / golden["file"], allow_pickle=False) as data:
                inputs, expected = golden_arrays(data, [s.name for s in model.inputs], names)
        except KeyError as exc:
            raise CheckFailed(
                f"{model.name} v{model.version}: golden data lacks {exc}",
                hint="the bundle is incomplete; rebuild it",
            ) from None
        arrays = [model.prepare(x, s) for x, s in zip(inputs, model.inputs, strict=True)]
        result = compare_golden_outputs(model.run_checked(arrays), expected, golden, names)
        if not result.ok:
            raise CheckFailed(
                f"{model.name} v{model.version} does not reproduce its golden outputs "
                f"({result.reason})",
                hint="the bundle does not run correctly on this device; rebuild it",
            )
        return
    feeds = [
        np.zeros([1 if not isinstance(d, int) else d for d in s.shape], s.np_dtype)
        for s in model.inputs
    ]
    outs = model.run_checked(feeds)
    if any(o.dtype.kind == "f" and not np.isfinite(o).all() for o in outs):
        raise CheckFailed(
            f"{model.name} gives NaN or Inf on a zero input", hint="the model file is broken"
        )


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


class Server:
    """An OIP v2 model server for one model, with micro-batching and hot swap.

    Args:
        path: a bundle folder, a model file, or a symbolic link to either.
        config: options; keyword arguments override single fields.

    Example:
        >>> server = Server("current", ServeConfig(watch=True, port=8000))   # doctest: +SKIP
        >>> server.run()                                                    # blocks until SIGTERM
        >>> server.swap("slots/b/model.bundle")                              # from another thread
    """

    def __init__(self, path: str | Path, config: ServeConfig | None = None, **overrides: Any):
        try:
            self.config = ServeConfig.model_validate(
                {**(config.model_dump() if config else {}), **overrides}
            )
        except ValidationError as exc:
            err = exc.errors()[0]
            raise EdgesmithError(
                f"serve option '{'.'.join(str(p) for p in err['loc'])}': {err['msg']}",
                hint="see `edgesmith serve --help`",
            ) from None
        self.path = Path(path)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._swap_lock = threading.Lock()
        self._draining = False
        self._server: Any = None
        self._slot: _Slot | None = None
        self.metrics = ServerMetrics(
            queue_depth=lambda: self._slot.batcher.depth if self._slot else 0
        )
        self._slot = self._open(self.path)
        self.metrics.set_model(self._slot.model.info)
        self.app = self._build_app()

    # ------------------------------------------------------------------ model slot and swap

    @property
    def model(self) -> Model:
        """The model being served now."""
        assert self._slot is not None
        return self._slot.model

    def _open(self, path: Path) -> _Slot:
        try:
            fp = _fingerprint(path)
        except OSError as exc:
            raise EdgesmithError(
                f"cannot read {path}: {exc.strerror}", hint="check the path"
            ) from None
        real = Path(fp[0])
        cfg = self.config
        model = load(
            real,
            device=cfg.device,
            threads=cfg.threads,
            backend=cfg.backend,
            nan_policy=cfg.nan_policy,
        )
        if cfg.self_check:
            _self_check(model, real)
        batcher = MicroBatcher(
            model.run_checked,
            max_batch=cfg.max_batch,
            max_wait=cfg.max_wait_ms / 1e3,
            max_queue=cfg.max_queue,
            deliver=self._deliver,
            stackable=model.batchable,
            on_batch=self.metrics.observe_batch,
            name=model.name,
            nice=cfg.inference_nice,
        )
        return _Slot(model, batcher, str(real), fp)

    def swap(self, path: str | Path | None = None) -> Model:
        """Load, verify and check a new model, then serve it instead of the current one.

        Requests already queued finish on the old model; new ones go to the new model. On any
        failure the current model keeps serving and the error is raised.

        Args:
            path: the new bundle or model file; None re-resolves the path the server was started with.

        Returns:
            The model now served.
        """
        with self._swap_lock:
            try:
                new = self._open(Path(path) if path is not None else self.path)
            except Exception:
                self.metrics.swaps.labels("failed").inc()
                raise
            old, self._slot = self._slot, new
            if old is not None and old.model.name != new.model.name:
                log.warning(
                    "the served model's name changed from '%s' to '%s': clients must use the new name",
                    old.model.name,
                    new.model.name,
                )
            self.metrics.swaps.labels("ok").inc()
            self.metrics.set_model(new.model.info)
            log.info(
                "hot swap: now serving %s v%s from %s (was v%s from %s)",
                new.model.name,
                new.model.version,
                new.source,
                old.model.version if old else None,
                old.source if old else None,
            )
        if old is not None:
            old.batcher.close(timeout=self.config.drain_timeout_s)
        return new.model

    async def _watch(self) -> None:
        failed: tuple[Any, ...] | None = None
        while True:
            await asyncio.sleep(self.config.watch_interval_s)
            try:
                fp = await asyncio.to_thread(_fingerprint, self.path)
            except OSError as exc:  # the link is being replaced, or the bundle is gone
                if failed != ("missing",):
                    log.error(
                        "watch: cannot resolve %s (%s); still serving the current model",
                        self.path,
                        exc,
                    )
                    failed = ("missing",)
                continue
            assert self._slot is not None
            if fp == self._slot.fingerprint or fp == failed:
                continue
            try:
                await asyncio.to_thread(self.swap, self.path)
                failed = None
            except Exception as exc:
                failed = fp
                msg = (
                    exc.message
                    if isinstance(exc, EdgesmithError)
                    else f"{type(exc).__name__}: {exc}"
                )
                log.error(
                    "hot swap to %s failed; still serving %s v%s: %s",
                    fp[0],
                    self.model.name,
                    self.model.version,
                    msg,
                )

    # ------------------------------------------------------------------ batch results -> asyncio

    def _deliver(self, batch: list[Pending]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_resolve, batch)

    # ------------------------------------------------------------------ HTTP

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

    def _find(self, request: Request) -> tuple[_Slot | None, Response | None]:
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
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(413, f"the body is over {limit} bytes, this server's limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _infer(self, request: Request) -> Response:
        denied = self._auth(request)
        if denied is not None:
            return denied
        slot, missing = self._find(request)
        if missing is not None:
            return missing
        body = await self._read_body(request)
        try:
            doc = _loads(body)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(400, f"the body is not valid JSON: {str(exc)[:200]}") from None
        loop = asyncio.get_running_loop()
        for _ in range(3):  # a swap between decode and submit: retry on the new model
            assert self._slot is not None
            slot = self._slot
            req = decode_request(doc, slot.model, self.config.max_batch)
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
        timer = loop.call_later(timeout, _expire, fut, item)
        try:
            result = await fut
        except DeadlineExceeded:
            return _error(
                504, f"the request did not finish within its deadline ({timeout * 1e3:.0f} ms)"
            )
        finally:
            timer.cancel()
        return _json(encode_response(slot.model, req, result))

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

    def _build_app(self) -> Starlette:
        async def infer(request: Request) -> Response:
            return await self._handle("infer", request, self._infer)

        async def live(request: Request) -> Response:
            return _json({"live": True})

        async def ready(request: Request) -> Response:
            ok = self._slot is not None and not self._draining
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
            return _json({"name": slot.model.name, "ready": not self._draining})

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
            lifespan=self._lifespan,
            exception_handlers={HTTPException: not_found},
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._loop = asyncio.get_running_loop()
        self._draining = False
        watcher = asyncio.create_task(self._watch()) if self.config.watch else None
        try:
            yield
        finally:
            self._draining = True
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            if self._slot is not None:
                await asyncio.to_thread(self._slot.batcher.close, self.config.drain_timeout_s)

    # ------------------------------------------------------------------ process

    def _bind(self) -> socket.socket:
        cfg = self.config
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(
                cfg.host, cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(1024)
        except OSError as exc:
            raise EdgesmithError(
                f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}",
                hint="pick another --port, or stop the process that uses it",
            ) from None
        return sock

    def stop(self) -> None:
        """Ask a running :meth:`run` to drain and return (thread-safe; what SIGTERM does)."""
        server = self._server
        if server is not None:
            self._draining = True
            if self._slot is not None:
                self._slot.batcher.flush()
            server.should_exit = True

    def run(self, ready_file: Path | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then drain requests in flight and return.

        Prints ``serving NAME vVERSION on http://HOST:PORT`` to stderr once listening, and writes
        the port to ``ready_file`` if given (useful with ``port=0``).
        """
        import uvicorn

        cfg = self.config
        sock = self._bind()
        host, port = sock.getsockname()[:2]
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=math.ceil(cfg.drain_timeout_s),
            limit_concurrency=cfg.max_connections,
            # longer than clients keep idle connections (httpx: 5 s), so that a client never sends
            # on a connection the server is closing at that moment
            timeout_keep_alive=20,
        )
        outer = self

        class _Uvicorn(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                # draining starts now: queued requests run without waiting for their batch to fill
                outer._draining = True
                if outer._slot is not None:
                    outer._slot.batcher.flush()
                super().handle_exit(sig, frame)

        server = _Uvicorn(config)
        self._server = server
        stopped: list[int] = []
        # uvicorn drains on SIGTERM/SIGINT and then re-raises the signal to the handler that was
        # installed before it: this one, so that a drained shutdown exits 0 instead of dying
        # (signals reach the main thread only; a server run in another thread is stopped by stop())
        main = threading.current_thread() is threading.main_thread()
        previous = (
            {
                sig: signal.signal(sig, lambda s, f: stopped.append(s))
                for sig in (signal.SIGTERM, signal.SIGINT)
            }
            if main
            else {}
        )
        m = self.model
        url_host = f"[{host}]" if ":" in host else host
        print(
            f"serving {m.name} v{m.version} ({m.info.get('backend')}/{m.info.get('provider')}, "
            f"{m.info.get('precision')}) on http://{url_host}:{port}",
            file=sys.stderr,
            flush=True,
        )
        if ready_file is not None:
            from edgesmith.fsutil import atomic_write_bytes

            atomic_write_bytes(ready_file, f"{port}\n".encode())
        try:
            asyncio.run(server.serve(sockets=[sock]))
        finally:
            sock.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if stopped:
            print(
                f"stopped ({signal.Signals(stopped[0]).name}); drained requests in flight",
                file=sys.stderr,
                flush=True,
            )


def _resolve(batch: list[Pending]) -> None:
    for item in batch:
        fut = item.context
        if fut.done():
            continue
        if item.error is not None:
            fut.set_exception(item.error)
        else:
            fut.set_result(item.result)


def _expire(fut: asyncio.Future[Any], item: Pending) -> None:
    if not fut.done():
        item.cancelled = True
        fut.set_exception(DeadlineExceeded())
