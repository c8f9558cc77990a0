"""Shared helpers of the pruning benchmarks: ONNX Runtime latency, interleaved so that the
baseline and every variant see the same machine load, and a plain table printer."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def onnx_session(model: torch.nn.Module, example: torch.Tensor, threads: int, folder: Path) -> Any:
    """Export ``model`` to ONNX (dynamic batch) and open it with edgesmith's ONNX Runtime backend."""
    from edgesmith.export.onnx import export
    from edgesmith.runtime import load

    path = export(model.eval(), (example,), Path(tempfile.mkdtemp(dir=folder)) / "model.onnx")
    return load(path, threads=threads, device="cpu"), path


def interleaved_latency(
    sessions: dict[str, Any], x: np.ndarray, rounds: int = 5, runs: int = 200
) -> dict[str, dict[str, float]]:
    """p50/p90 latency (ms) of every session on ``x``; rounds alternate between sessions and the
    median over rounds is kept, so a burst of load on the shared machine hits all of them."""
    from edgesmith.runtime.bench import time_fn

    p50: dict[str, list[float]] = {k: [] for k in sessions}
    p90: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            t = time_fn(lambda s=s: s(x), warmup=20, runs=runs, max_seconds=10.0)
            p50[name].append(t["p50"])
            p90[name].append(t["p90"])
    return {
        k: {"p50": statistics.median(p50[k]), "p90": statistics.median(p90[k])} for k in sessions
    }


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with (key, header) ``columns``."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
