"""Latency measurement shared by ``build``, ``bench`` and the benchmarks (numpy + stdlib only)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["time_fn"]


def time_fn(
    fn: Callable[[], Any],
    warmup: int = 10,
    runs: int = 100,
    min_seconds: float = 0.0,
    max_seconds: float = 30.0,
) -> dict[str, float]:
    """Call ``fn`` repeatedly and report latency percentiles in milliseconds.

    Runs ``warmup`` untimed calls, then at least ``runs`` timed calls (and at least
    ``min_seconds`` of them), stopping early after ``max_seconds``.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and len(times) >= 5:
            break
    ms = np.asarray(times) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "min": float(ms.min()),
        "runs": len(ms),
    }
