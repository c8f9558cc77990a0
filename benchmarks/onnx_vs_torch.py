"""ONNX Runtime (through edgesmith.runtime) vs PyTorch eager on the reference model.

    python benchmarks/onnx_vs_torch.py [--threads 2] [--runs 300]

Measures, in one run: parity over the 10k Fashion-MNIST test set (top-1 agreement, max abs logit
difference), latency at batch 1 and batch 32 (p50/p90, ratio to PyTorch eager), and cold start
(a fresh interpreter: import + load + first inference). Prints a table; writes
benchmarks/results/onnx_vs_torch.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _timing import interleaved

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "examples" / "fashion_mnist" / "recipe-fp32.yaml"

COLD_ORT = """
import time; t0 = time.perf_counter()
import numpy as np
from edgesmith.runtime import load
m = load({path!r}, threads={threads}); m(np.zeros((1, 1, 28, 28), np.float32))
print(time.perf_counter() - t0)
"""
COLD_TORCH = """
import time; t0 = time.perf_counter()
import torch
torch.set_num_threads({threads})
from edgesmith.models import build_model
from edgesmith.recipe import load_recipe
m = build_model(load_recipe({recipe!r}).model)
with torch.inference_mode(): m(torch.zeros(1, 1, 28, 28))
print(time.perf_counter() - t0)
"""


def cold(code: str, repeats: int) -> float:
    times = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            ).stdout.split()[-1]
        )
        for _ in range(repeats)
    ]
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cold-repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onnx_vs_torch.json"))
    args = ap.parse_args()

    from edgesmith.export.onnx import export
    from edgesmith.export.parity import compare_outputs
    from edgesmith.measure import torch_outputs
    from edgesmith.pipeline import prepare
    from edgesmith.recipe import load_recipe
    from edgesmith.runtime import load

    torch.set_num_threads(args.threads)
    p = prepare(load_recipe(RECIPE))
    tmp = Path(tempfile.mkdtemp())
    path = export(p.model, (p.example,), tmp / "fmnist.onnx")
    model = load(path, threads=args.threads)

    ref, targets = torch_outputs(p.model, p.data.eval)
    xs = np.concatenate([p.data.eval[i][0].numpy()[None] for i in range(len(p.data.eval))])
    ort_out = np.concatenate([model(xs[i : i + 500]) for i in range(0, len(xs), 500)])
    parity = compare_outputs(ref, ort_out, 0.999, 1e-4)

    rows = []
    for batch in (1, 32):
        xb = xs[:batch]
        tb = torch.from_numpy(xb)

        def torch_call(tb: torch.Tensor = tb) -> None:
            with torch.inference_mode():
                p.model(tb)

        # interleaved rounds: both contenders see the same load on this shared machine
        timed = interleaved(
            {"torch": torch_call, "ort": lambda xb=xb: model(xb)},
            rounds=args.rounds,
            runs=max(args.runs // args.rounds, 5),
        )
        t, o = timed["torch"], timed["ort"]
        rows.append(
            {
                "batch": batch,
                "torch_p50_ms": t["p50"],
                "torch_p90_ms": t["p90"],
                "ort_p50_ms": o["p50"],
                "ort_p90_ms": o["p90"],
                "speedup": t["p50"] / o["p50"],
            }
        )

    cold_ort = cold(COLD_ORT.format(path=str(path), threads=args.threads), args.cold_repeats)
    cold_torch = cold(
        COLD_TORCH.format(recipe=str(RECIPE), threads=args.threads), args.cold_repeats
    )

    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": model.info["version"],
        },
        "date": time.strftime("%Y-%m-%d"),
        "parity": {
            "samples": parity.samples,
            "top1_agreement": parity.top1_agreement,
            "max_abs_diff": parity.max_abs_diff,
            "torch_accuracy": float((ref.argmax(1) == targets).mean()),
            "ort_accuracy": float((ort_out.argmax(1) == targets).mean()),
        },
        "latency": rows,
        "cold_start_s": {
            "edgesmith_runtime_ort": cold_ort,
            "torch_eager": cold_torch,
            "ratio": cold_torch / cold_ort,
        },
    }
    print(
        f"parity over {parity.samples} test images: top-1 agreement {parity.top1_agreement:.4f}, max |diff| {parity.max_abs_diff:.2e}"
    )
    print(f"{'batch':>5} | {'torch p50':>10} | {'ORT p50':>9} | {'ORT p90':>9} | ORT speed-up")
    for r in rows:
        print(
            f"{r['batch']:>5} | {r['torch_p50_ms']:8.3f}ms | {r['ort_p50_ms']:7.3f}ms | {r['ort_p90_ms']:7.3f}ms | {r['speedup']:.2f}x"
        )
    print(
        f"cold start (import + load + first inference): runtime/ORT {cold_ort:.2f} s, torch {cold_torch:.2f} s ({cold_torch / cold_ort:.1f}x)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
