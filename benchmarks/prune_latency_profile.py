"""Where the batch-1 time of the (pruned) SmallCNN goes in ONNX Runtime: kernels vs overhead.

    python benchmarks/prune_latency_profile.py [--threads 1,2] [--sparsity 0.5,0.7] [--runs 2000]

For the unpruned model and each pruned variant (l2, per layer, channels in multiples of 8) this
runs ONNX Runtime's own profiler over ``--runs`` batch-1 inferences and splits the wall time per
inference into the time inside operator kernels (by operator type) and the rest (session run,
input/output handling, thread-pool hand-offs). Pruning shrinks the kernel time roughly with the
MACs; the rest is fixed per inference and caps the end-to-end speed-up of a tiny model.
Writes benchmarks/results/prune_latency_profile.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from prune_common import table  # noqa: E402


def profile(path: Path, threads: int, x: np.ndarray, runs: int) -> dict[str, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # plain timing first (profiling adds its own cost)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(50):
        sess.run(None, {name: x})
    t0 = time.perf_counter()
    for _ in range(runs):
        sess.run(None, {name: x})
    wall_us = (time.perf_counter() - t0) / runs * 1e6
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, {name: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    model_run = []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            model_run.append(e["dur"])
    kernels = {k: v / runs for k, v in by_op.items()}
    return {
        "wall_us": wall_us,
        "model_run_us": float(np.median(model_run)) if model_run else float("nan"),
        "kernel_us": sum(kernels.values()),
        **{f"op_{k}_us": v for k, v in sorted(kernels.items())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--sparsity", default="0.5,0.7")
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "prune_latency_profile.json")
    )
    args = ap.parse_args()

    from edgesmith.compress.pruning.structured import StructuredPruner
    from edgesmith.export.onnx import export
    from edgesmith.measure import count_macs
    from edgesmith.models import build_model
    from edgesmith.recipe import load_recipe

    recipe = load_recipe(ROOT / "examples" / "fashion_mnist" / "recipe.yaml")
    base = build_model(recipe.model)
    x1 = torch.zeros(1, 1, 28, 28)
    tmp = Path(tempfile.mkdtemp())
    variants = {"unpruned": base}
    for s in (float(v) for v in args.sparsity.split(",")):
        m = copy.deepcopy(base)
        pr = StructuredPruner(m, x1, importance="l2", round_to=8)
        pr.prune_to_macs(int(pr.base_macs * (1 - s)))
        variants[f"{s:.0%} x8"] = m
    base_macs = count_macs(base, x1)
    rows = []
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    for name, m in variants.items():
        path = export(m.eval(), (x1,), tmp / f"{name.replace(' ', '_').replace('%', '')}.onnx")
        for threads in (int(t) for t in args.threads.split(",")):
            r = profile(path, threads, x, args.runs)
            rows.append(
                {
                    "variant": name,
                    "threads": threads,
                    "macs_removed": round(1 - count_macs(m, x1) / base_macs, 3),
                    **r,
                }
            )
    for r in rows:
        b = next(q for q in rows if q["variant"] == "unpruned" and q["threads"] == r["threads"])
        r["speedup_wall"] = b["wall_us"] / r["wall_us"]
        r["speedup_kernels"] = b["kernel_us"] / r["kernel_us"]
        r["overhead_us"] = r["wall_us"] - r["kernel_us"]
        r["conv_us"] = r.get("op_Conv_us", 0.0)
    print(
        table(
            rows,
            [
                ("variant", "variant"),
                ("threads", "threads"),
                ("macs_removed", "MACs removed"),
                ("wall_us", "wall µs"),
                ("kernel_us", "kernels µs"),
                ("conv_us", "Conv µs"),
                ("overhead_us", "rest µs"),
                ("speedup_wall", "speed-up wall"),
                ("speedup_kernels", "speed-up kernels"),
            ],
        )
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"date": time.strftime("%Y-%m-%d"), "runs": args.runs, "rows": rows}, indent=2)
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
