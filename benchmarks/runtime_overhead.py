"""Overhead of ``edgesmith.runtime.load()`` + ``model(x)`` over raw ``onnxruntime.InferenceSession.run``.

Target (issue 6): at most 3% on the reference model at batch 1. Both sessions are opened with the
same options (one intra-op thread, full graph optimisation, CPU provider) and run the same array;
calls alternate in short blocks in a shuffled order, so that the shared machine's noise hits both
sides alike, and the figure is the median over rounds of the per-round ratio of CPU time of the
calling thread (where onnxruntime computes with one intra-op thread; other processes do not inflate
it); wall-clock ratios are reported beside it. The default
``nan_policy="error"`` (a NaN/Inf scan of every input) is measured, and ``nan_policy="allow"`` beside it.

    .venv/bin/python benchmarks/runtime_overhead.py [--rounds 300] [--model M.onnx]

Writes ``benchmarks/results/runtime_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
from runtime_reference import RESULTS, reference_onnx

from edgesmith.runtime import load


def _block(fn, n: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Microseconds per call: wall time, and CPU time of this thread (where onnxruntime computes
    with one intra-op thread), which other processes on a shared machine do not inflate."""
    w, c = time.perf_counter_ns(), time.thread_time_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - w) / n / 1e3, (time.thread_time_ns() - c) / n / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="ONNX file (default: the reference)")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--calls", type=int, default=50, help="calls per block")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--instances", type=int, default=3, help="sessions per side")
    args = ap.parse_args()
    path = args.model or reference_onnx()

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    # several sessions per side: two InferenceSessions of one file differ by a few percent between
    # themselves (memory placement), which would otherwise pass for overhead
    n = args.instances
    raws = [
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]) for _ in range(n)
    ]
    name = raws[0].get_inputs()[0].name
    out_names = [o.name for o in raws[0].get_outputs()]
    models = [load(path, device="cpu", threads=args.threads) for _ in range(n)]
    allows = [load(path, device="cpu", threads=args.threads, nan_policy="allow") for _ in range(n)]
    shape = [1 if not isinstance(d, int) else d for d in models[0].inputs[0].shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(raws[0].run(out_names, {name: x})[0], models[0](x), rtol=0, atol=0)

    sides = {"raw": [partial(r.run, out_names, {name: x}) for r in raws]}
    sides["edgesmith"] = [partial(m, x) for m in models]
    sides["edgesmith_allow"] = [partial(m, x) for m in allows]
    fns = {(k, i): f for k, fs in sides.items() for i, f in enumerate(fs)}
    for fn in fns.values():
        for _ in range(200):
            fn()
    wall: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.rounds):
        order = list(fns)
        random.shuffle(order)
        got: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
        for key in order:
            got[key[0]].append(_block(fns[key], args.calls))
        for k, blocks in got.items():  # one figure per side and round: the mean over its sessions
            wall[k].append(float(np.mean([b[0] for b in blocks])))
            cpu[k].append(float(np.mean([b[1] for b in blocks])))
    result = {
        "model": str(path),
        "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
        "threads": args.threads,
        "rounds": args.rounds,
        "calls_per_block": args.calls,
        "sessions_per_side": args.instances,
        "onnxruntime": ort.__version__,
    }
    print(
        f"{path.name}, batch 1, {args.threads} thread(s), {args.rounds} rounds x {args.calls} calls, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'':16} {'clock':5} {'median us':>10} {'ratio (median of rounds)':>25} {'IQR':>16}")
    for clock, times in (("cpu", cpu), ("wall", wall)):
        base = np.asarray(times["raw"])
        result[clock] = {}
        for k, v in times.items():
            ratios = np.asarray(v) / base
            q1, med, q3 = np.percentile(ratios, [25, 50, 75])
            result[clock][k] = {
                "us_per_call_median": round(float(np.median(v)), 2),
                "ratio_median": round(float(med), 4),
                "ratio_iqr": [round(float(q1), 4), round(float(q3), 4)],
            }
            print(f"{k:16} {clock:5} {np.median(v):10.1f} {med:25.4f} {q1:7.3f} - {q3:6.3f}")
    ratio = result["cpu"]["edgesmith"]["ratio_median"]
    result["target"] = {"max_ratio": 1.03, "clock": "cpu", "met": ratio <= 1.03}
    print(
        f"load() + call vs raw InferenceSession.run (CPU time): {100 * (ratio - 1):+.1f}% "
        f"(nan_policy='allow': {100 * (result['cpu']['edgesmith_allow']['ratio_median'] - 1):+.1f}%; target <= +3%)"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtime_overhead.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
