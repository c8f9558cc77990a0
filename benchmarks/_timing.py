"""Latency comparison that is fair on a shared, noisy machine: interleave the contenders."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["interleaved"]


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int = 10, runs: int = 30, warmup: int = 10
) -> dict[str, dict[str, float]]:
    """Time each function in alternating rounds so a burst of load hits every contender alike.

    Returns per name the p50/p90/p99/mean latency in ms over all ``rounds * runs`` calls.
    """
    import time

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        ms = np.asarray(ts) * 1e3
        out[name] = {
            "p50": float(np.percentile(ms, 50)),
            "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()),
            "runs": len(ms),
        }
    return out
