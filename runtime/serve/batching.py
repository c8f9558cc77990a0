"""Dynamic micro-batching: requests that arrive close together run as one batch (stdlib + numpy).

One worker thread per model takes requests from a bounded queue. A batch closes when it holds
``max_batch`` samples or ``max_wait`` seconds after its first request arrived, whichever comes
first; requests whose deadline passed while queued are answered with :class:`DeadlineExceeded`
and never run. Each batch's results are split back per request by sample count, so no request
ever sees another's data. The batcher knows nothing about HTTP or asyncio: it calls
``deliver(batch)`` from its thread once per batch, after setting each request's result or error.

Example:
    >>> b = MicroBatcher(model, max_batch=32, max_wait=0.002, max_queue=256, deliver=print)  # doctest: +SKIP
    >>> b.submit(Pending([x], n=1, deadline=time.monotonic() + 1.0))                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["BatcherClosed", "DeadlineExceeded", "MicroBatcher", "Pending", "QueueFull"]

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already: shed load (HTTP 503)."""


class BatcherClosed(Exception):
    """The batcher was closed (its model was swapped out); submit to the current one."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before it could run (HTTP 504)."""


class Pending:
    """One request: its checked input arrays (batch first), sample count and deadline.

    After the batch that carried it ran, exactly one of ``result`` (a list of output arrays) or
    ``error`` is set. ``context`` is the caller's (e.g. the future to resolve).
    """

    __slots__ = ("arrays", "cancelled", "context", "deadline", "enqueued", "error", "n", "result")

    def __init__(
        self, arrays: list[np.ndarray], n: int, deadline: float, context: Any = None
    ) -> None:
        self.arrays = arrays
        self.n = n
        self.deadline = deadline
        self.context = context
        self.enqueued = 0.0
        self.cancelled = False
        self.result: list[np.ndarray] | None = None
        self.error: BaseException | None = None


class MicroBatcher:
    """A bounded queue and one worker thread that runs queued requests in batches.

    Args:
        run: runs one batch: a list of arrays (one per model input, batch first) -> output arrays.
        max_batch: most samples per batch (1 disables batching).
        max_wait: seconds a batch waits for more requests after its first one arrived.
        max_queue: most requests waiting; ``submit`` raises QueueFull beyond it.
        deliver: called from the worker thread with each finished batch.
        stackable: False for models with a fixed batch dimension: requests then run one by one.
        on_batch: optional ``(samples, seconds)`` callback for metrics.
        nice: raise the worker thread's nice value by this much (Linux), so that the threads
            taking requests run first when the CPU is short.
    """

    def __init__(
        self,
        run: Callable[[list[np.ndarray]], list[np.ndarray]],
        max_batch: int,
        max_wait: float,
        max_queue: int,
        deliver: Callable[[list[Pending]], None],
        stackable: bool = True,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "model",
        nice: int = 0,
    ) -> None:
        self.nice = nice
        self._run = run
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait))
        self.max_queue = max(1, int(max_queue))
        self._deliver = deliver
        self._stackable = stackable
        self._on_batch = on_batch
        self._queue: deque[Pending] = deque()
        self._samples = 0
        self._cond = threading.Condition()
        self._closing = False
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        return len(self._queue)

    def submit(self, item: Pending) -> None:
        """Queue one request.

        Raises:
            QueueFull: ``max_queue`` requests are already waiting.
            BatcherClosed: the batcher is shut down.
        """
        with self._cond:
            if self._stopped or self._closing:
                raise BatcherClosed
            if len(self._queue) >= self.max_queue:
                raise QueueFull
            item.enqueued = time.monotonic()
            self._queue.append(item)
            self._samples += item.n
            self._cond.notify()

    def flush(self) -> None:
        """Stop waiting for batches to fill: run what is queued now (used when draining)."""
        with self._cond:
            self.max_wait = 0.0
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, run those already queued, and end the worker thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker

    def _take(self) -> list[Pending] | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                self._stopped = True
                return None
            if self._stackable:
                first = self._queue[0].enqueued
                while self._samples < self.max_batch and not self._closing:
                    left = first + self.max_wait - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            batch = [self._queue.popleft()]
            total = batch[0].n
            while self._stackable and self._queue and total + self._queue[0].n <= self.max_batch:
                item = self._queue.popleft()
                batch.append(item)
                total += item.n
            self._samples -= total
            return batch

    def _work(self) -> None:
        if self.nice and hasattr(os, "setpriority"):
            # Linux threads have their own nice value: inference yields the CPU to the thread that
            # parses requests, so that admission control (QueueFull -> 503) stays prompt under load
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        while True:
            batch = self._take()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for item in batch:
                if item.cancelled or now > item.deadline:
                    item.error = DeadlineExceeded()
                else:
                    live.append(item)
            if live:
                self._run_batch(live)
            try:
                self._deliver(batch)
            except Exception:  # the receiver is gone (e.g. event loop closed): nothing to answer
                log.exception("could not deliver a batch of %d results", len(batch))

    def _run_batch(self, live: list[Pending]) -> None:
        # only requests whose inputs have the same shapes (but for the batch) stack: token
        # sequences of different lengths run as separate batches, never padded into each other
        groups: dict[tuple[Any, ...], list[Pending]] = {}
        for item in live:
            key = tuple(a.shape[1:] if a.ndim else () for a in item.arrays)
            groups.setdefault(key, []).append(item)
        for group in groups.values():
            self._run_group(group)

    def _run_group(self, live: list[Pending]) -> None:
        t0 = time.perf_counter()
        total = sum(item.n for item in live)
        try:
            if len(live) == 1:
                live[0].result = self._run(live[0].arrays)
            else:
                stacked = [
                    np.concatenate([item.arrays[i] for item in live])
                    for i in range(len(live[0].arrays))
                ]
                outs = self._run(stacked)
                if any(o.ndim == 0 or o.shape[0] != total for o in outs):
                    # outputs without a batch dimension cannot be split: run one by one
                    for item in live:
                        item.result = self._run(item.arrays)
                else:
                    start = 0
                    for item in live:
                        item.result = [o[start : start + item.n] for o in outs]
                        start += item.n
        except Exception as exc:
            log.error("inference failed for a batch of %d request(s): %s", len(live), exc)
            for item in live:
                item.result = None
                item.error = exc
        if self._on_batch is not None:
            self._on_batch(total, time.perf_counter() - t0)
