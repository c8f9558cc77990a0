"""``edgesmith serve``: a model server speaking the Open Inference Protocol v2 (KServe/Triton REST).

The :class:`Server` holds the model being served (a slot: the model, its micro-batcher and its
request limits), swaps it (:mod:`~edgesmith.runtime.serve.swap`), and runs the HTTP routes
(:mod:`~edgesmith.runtime.serve.app`) under uvicorn. SIGTERM stops accepting connections, lets the
requests in flight finish, then exits 0. With ``trusted_keys`` (``--key``) and
``require_signature`` only signed bundles are served, at start and on every hot swap
(docs/security.md).

Built on Starlette and uvicorn (the ``serve`` extra): the ASGI toolkit under FastAPI, without
FastAPI's request models, because bodies must be size-capped before they are parsed and OIP
tensors are checked against the model, not against a static schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgesmith.errors import EdgesmithError
from edgesmith.runtime.model import Model, load
from edgesmith.runtime.serve.app import App
from edgesmith.runtime.serve.batching import MicroBatcher, Pending
from edgesmith.runtime.serve.metrics import ServerMetrics
from edgesmith.runtime.serve.oip import RequestLimits
from edgesmith.runtime.serve.swap import fingerprint, self_check, watch
from edgesmith.text import printable
from edgesmith.validation import validate

__all__ = ["ServeConfig", "Server", "Slot"]

log = logging.getLogger("edgesmith.runtime.serve")


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
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="most seconds a client may take to send a request body (408)",
    )
    max_decoded_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="most bytes of a request's tensors as sent (413; None: max_body_bytes); once "
        "preprocessed, that or two full batches of the model's input, whichever is larger",
    )
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="public key files (NAME.pub) or folders of them: a bundle's signature must "
        "verify against one (at start and on every hot swap)",
    )
    require_signature: bool = Field(
        default=False, description="serve signed bundles only (needs trusted_keys)"
    )
    decode_threads: int = Field(
        default=2, ge=1, le=64, description="threads that parse and preprocess requests"
    )
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
class Slot:
    """The model being served, its micro-batcher and its request limits."""

    model: Model
    batcher: MicroBatcher
    source: str
    fingerprint: tuple[Any, ...]
    limits: RequestLimits


def _limits(model: Model, config: ServeConfig) -> RequestLimits:
    """The request limits for ``model``: tensors up to the body limit (or ``max_decoded_bytes``),
    and after preprocessing up to that or a full batch of the model's input, whichever is larger
    (what the model's own working set holds anyway)."""
    decoded = config.max_decoded_bytes or config.max_body_bytes
    full_batch = 0
    for spec in model.inputs:
        dims = spec.shape[1:] if spec.batched else spec.shape
        if all(isinstance(d, int) for d in dims):
            per = math.prod(int(d) for d in dims) * spec.np_dtype.itemsize
            full_batch += per * (config.max_batch if spec.batched else 1)
    return RequestLimits(config.max_batch, decoded, max(decoded, 2 * full_batch))


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
        self.config = validate(
            ServeConfig,
            {**(config.model_dump() if config else {}), **overrides},
            source="serve options",
            hint="see `edgesmith serve --help`",
        )
        if self.config.require_signature and not self.config.trusted_keys:
            raise EdgesmithError(
                "serving signed bundles only needs the publisher's public key",
                hint="pass --key NAME.pub with --require-signature",
            )
        self.path = Path(path)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._swap_lock = threading.Lock()
        self.draining = False
        self._server: Any = None
        self._slot: Slot | None = None
        self.metrics = ServerMetrics(
            queue_depth=lambda: self._slot.batcher.depth if self._slot else 0
        )
        self._slot = self._open(self.path)
        self.metrics.set_model(self._slot.model.info)
        self._http = App(self)
        self.app = self._http.build()

    # ------------------------------------------------------------------ model slot and swap

    @property
    def slot(self) -> Slot | None:
        """The model being served now, with its batcher and limits."""
        return self._slot

    @property
    def model(self) -> Model:
        """The model being served now."""
        assert self._slot is not None
        return self._slot.model

    def _open(self, path: Path) -> Slot:
        try:
            fp = fingerprint(path)
        except OSError as exc:
            raise EdgesmithError(
                f"cannot read {printable(path)}: {exc.strerror}", hint="check the path"
            ) from None
        real = Path(fp[0])
        cfg = self.config
        model = load(
            real,
            device=cfg.device,
            threads=cfg.threads,
            backend=cfg.backend,
            nan_policy=cfg.nan_policy,
            trusted_keys=list(cfg.trusted_keys) or None,
            require_signature=cfg.require_signature,
        )
        if cfg.self_check:
            self_check(model, real)
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
        return Slot(model, batcher, str(real), fp, _limits(model, cfg))

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
                printable(new.source),
                old.model.version if old else None,
                printable(old.source) if old else None,
            )
        if old is not None:
            old.batcher.close(timeout=self.config.drain_timeout_s)
        return new.model

    # ------------------------------------------------------------------ batch results -> asyncio

    def _deliver(self, batch: list[Pending]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_resolve, batch)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        self._loop = asyncio.get_running_loop()
        self.draining = False
        watcher = asyncio.create_task(watch(self)) if self.config.watch else None
        try:
            yield
        finally:
            self.draining = True
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            if self._slot is not None:
                await asyncio.to_thread(self._slot.batcher.close, self.config.drain_timeout_s)
            self._http.close()

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
            self.draining = True
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
                outer.draining = True
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
            f"{printable(m.info.get('precision'))}) on http://{url_host}:{port}",
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
