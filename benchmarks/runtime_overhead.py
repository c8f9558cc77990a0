"""Overhead of ``edgesmith.runtime.load()`` + ``model(x)`` over raw ``onnxruntime.InferenceSession.run``.

Target (issue 6): at most 3% on the reference model at batch 1. Both sessions are opened with the
same options (one intra-op thread, full graph optimisation, CPU provider) and run the same array;
calls alternate in short blocks in a shuffled order, so that the shared machine's noise hits both
sides alike, and the figure is the median over rounds of the per-round ratio. The default
``nan_policy="error"`` (a NaN/Inf scan of every input) is measured, and ``nan_policy="allow"`` beside it.

    .venv/bin/python benchmarks/runtime_overhead.py [--rounds 300] [--model M.onnx]

Writes ``benchmarks/results/runtime_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from runtime_reference import RESULTS, reference_onnx

from edgesmith.runtime import load


def _block(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - t) / n / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="ONNX file (default: the reference)")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--calls", type=int, default=50, help="calls per block")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    path = args.model or reference_onnx()

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    raw = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = raw.get_inputs()[0].name
    out_names = [o.name for o in raw.get_outputs()]
    model = load(path, device="cpu", threads=args.threads)
    model_allow = load(path, device="cpu", threads=args.threads, nan_policy="allow")
    shape = [1 if not isinstance(d, int) else d for d in model.inputs[0].shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(raw.run(out_names, {name: x})[0], model(x), rtol=0, atol=0)

    fns = {
        "raw": lambda: raw.run(out_names, {name: x}),
        "edgesmith": lambda: model(x),
        "edgesmith_allow": lambda: model_allow(x),
    }
    for fn in fns.values():
        for _ in range(200):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.rounds):
        order = list(fns)
        random.shuffle(order)
        for k in order:
            times[k].append(_block(fns[k], args.calls))
    raw_t = np.asarray(times["raw"])
    result = {
        "model": str(path),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "rounds": args.rounds,
        "calls_per_block": args.calls,
        "onnxruntime": ort.__version__,
        "us_per_call_median": {k: round(float(np.median(v)), 2) for k, v in times.items()},
        "overhead": {},
    }
    print(
        f"{path.name}, batch 1, {args.threads} thread(s), {args.rounds} rounds x {args.calls} calls"
    )
    print(f"{'':18} {'median us':>10} {'ratio (median of rounds)':>26} {'IQR':>16}")
    for k, v in times.items():
        ratios = np.asarray(v) / raw_t
        q1, med, q3 = np.percentile(ratios, [25, 50, 75])
        result["overhead"][k] = {
            "ratio_median": round(float(med), 4),
            "ratio_iqr": [round(float(q1), 4), round(float(q3), 4)],
        }
        print(f"{k:18} {np.median(v):10.1f} {med:26.4f} {q1:7.3f} - {q3:6.3f}")
    ratio = result["overhead"]["edgesmith"]["ratio_median"]
    result["target"] = {"max_ratio": 1.03, "met": ratio <= 1.03}
    print(f"load() + call vs raw InferenceSession.run: {100 * (ratio - 1):+.1f}% (target <= +3%)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtime_overhead.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
