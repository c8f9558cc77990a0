"""The micro-batcher on the real reference model, without HTTP."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgesmith.runtime import load
from edgesmith.runtime.serve.batching import (
    BatcherClosed,
    DeadlineExceeded,
    MicroBatcher,
    Pending,
    QueueFull,
)


class Collector:
    def __init__(self) -> None:
        self.done: list[Pending] = []
        self.event = threading.Event()
        self.want = 0

    def __call__(self, batch: list[Pending]) -> None:
        self.done += batch
        if len(self.done) >= self.want:
            self.event.set()


def test_batches_form_and_each_request_gets_its_own_rows(models):
    model = load(models.onnx, device="cpu")
    sizes: list[int] = []
    got = Collector()
    got.want = 12
    gate = threading.Event()

    def run(arrays):
        gate.wait(10)  # hold the first batch so that the others queue up behind it
        return model.run_checked(arrays)

    b = MicroBatcher(
        run,
        max_batch=8,
        max_wait=0.05,
        max_queue=64,
        deliver=got,
        on_batch=lambda n, s: sizes.append(n),
    )
    items = []
    for i in range(12):
        n = 1 + i % 3  # requests of 1, 2 and 3 samples
        x = models.inputs[i * 3 : i * 3 + n]
        items.append(Pending([x], n, time.monotonic() + 30))
        b.submit(items[-1])
    gate.set()
    assert got.event.wait(30)
    b.close()
    assert sum(sizes) == sum(it.n for it in items) and max(sizes) <= 8 and len(sizes) < 12
    for i, it in enumerate(items):
        assert it.error is None
        np.testing.assert_allclose(
            it.result[0], model(models.inputs[i * 3 : i * 3 + it.n]), atol=1e-5
        )


def test_full_queue_and_deadlines(models):
    model = load(models.onnx, device="cpu")
    gate = threading.Event()
    ran: list[int] = []

    def run(arrays):
        gate.wait(10)
        ran.append(arrays[0].shape[0])
        return model.run_checked(arrays)

    got = Collector()
    got.want = 3
    b = MicroBatcher(run, max_batch=1, max_wait=0, max_queue=2, deliver=got)
    first = Pending([models.inputs[:1]], 1, time.monotonic() + 30)
    b.submit(first)
    time.sleep(0.2)  # the worker holds `first`; the queue is empty again
    late = Pending([models.inputs[1:2]], 1, time.monotonic() + 0.05)
    b.submit(late)
    b.submit(Pending([models.inputs[2:3]], 1, time.monotonic() + 30))
    with pytest.raises(QueueFull):
        b.submit(Pending([models.inputs[3:4]], 1, time.monotonic() + 30))
    time.sleep(0.1)  # `late` expires while it waits
    gate.set()
    assert got.event.wait(30)
    assert isinstance(late.error, DeadlineExceeded) and late.result is None
    assert ran == [1, 1]  # the expired request never ran
    b.close()
    with pytest.raises(BatcherClosed):
        b.submit(first)


def test_close_drains_queued_requests(models):
    model = load(models.onnx, device="cpu")
    got = Collector()
    got.want = 20
    b = MicroBatcher(model.run_checked, max_batch=4, max_wait=0.5, max_queue=64, deliver=got)
    items = [Pending([models.inputs[i : i + 1]], 1, time.monotonic() + 30) for i in range(20)]
    for it in items:
        b.submit(it)
    b.close(timeout=30)
    assert all(it.result is not None for it in items)


def test_a_failing_batch_fails_only_its_requests(models):
    model = load(models.onnx, device="cpu")
    calls = {"n": 0}

    def run(arrays):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return model.run_checked(arrays)

    got = Collector()
    got.want = 2
    b = MicroBatcher(run, max_batch=1, max_wait=0, max_queue=8, deliver=got)
    bad, good = (Pending([models.inputs[i : i + 1]], 1, time.monotonic() + 30) for i in range(2))
    b.submit(bad)
    b.submit(good)
    assert got.event.wait(30)
    b.close()
    assert "device lost" in str(bad.error) and good.result is not None
