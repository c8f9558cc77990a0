"""Prune + distil the reference SmallCNN on Fashion-MNIST; accuracy and ONNX Runtime latency.

    python benchmarks/prune_fmnist.py [--epochs 3] [--threads 2] [--students 0.5:8,0.5:16,0.611:16]

In one run: a sweep of pruning settings whose batch-1 and batch-32 ONNX Runtime latencies are
measured interleaved with the unpruned model's (ratios under the same load; the unstructured row
shows what zeros alone do) -> benchmarks/results/prune_fmnist_latency.json; then, for each
``--students`` entry (sparsity target, channel multiple), the pruned model (l2, per layer) before and after
distillation from the unpruned model, accuracy on the full 10k test set ->
benchmarks/results/prune_fmnist.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from prune_common import interleaved_latency, onnx_session, table  # noqa: E402

RECIPE = ROOT / "examples" / "fashion_mnist" / "recipe.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument(
        "--students",
        default="0.5:8,0.5:16,0.611:16",
        help="comma-separated SPARSITY:ROUND_TO, one distilled student each (0.611 = 2.57x fewer MACs)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sweep", default="0.5,0.6,0.7,0.8")
    ap.add_argument("--no-distill", action="store_true", help="only the latency sweep")
    ap.add_argument("--no-sweep", action="store_true", help="only the distilled students")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prune_fmnist.json"))
    ap.add_argument(
        "--sweep-out", default=str(ROOT / "benchmarks" / "results" / "prune_fmnist_latency.json")
    )
    args = ap.parse_args()

    from edgesmith.compress.distill import DistillConfig, distill
    from edgesmith.compress.pruning.structured import StructuredPruner, layer_widths
    from edgesmith.compress.pruning.unstructured import compressed_size, prune_unstructured_
    from edgesmith.measure import count_macs, model_size_bytes, torch_outputs
    from edgesmith.pipeline import prepare
    from edgesmith.recipe import load_recipe

    torch.set_num_threads(args.threads)
    p = prepare(load_recipe(RECIPE))
    x1 = p.example
    tmp = Path(tempfile.mkdtemp())
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
    }

    def acc(m: torch.nn.Module) -> float:
        return float(p.metric(*torch_outputs(m, p.data.eval)))

    def prune(
        sparsity: float, round_to: int | None, scope: str = "layer"
    ) -> tuple[torch.nn.Module, float]:
        m = copy.deepcopy(p.model)
        t0 = time.perf_counter()
        pr = StructuredPruner(m, x1, importance="l2", scope=scope, round_to=round_to)
        pr.prune_to_macs(int(pr.base_macs * (1 - sparsity)))
        return m, time.perf_counter() - t0

    base_macs = count_macs(p.model, x1)
    if not args.no_sweep:
        # latency: shapes decide it, so undistilled pruned variants stand in for distilled ones
        variants: dict[str, torch.nn.Module] = {"unpruned": p.model}
        for s in [float(v) for v in args.sweep.split(",")]:
            for rt in (8, 16, None):
                variants[f"{s:.0%} x{rt or 1}"] = prune(s, rt)[0]
        variants["50% x8 global"] = prune(0.5, 8, "global")[0]
        unstructured = copy.deepcopy(p.model)
        zeros = prune_unstructured_(unstructured, 0.5)
        variants["unstructured 50% zeros"] = unstructured
        lat: dict[str, dict[int, dict[int, dict[str, float]]]] = {}
        for threads in sorted({1, args.threads}):
            sessions = {k: onnx_session(m, x1, threads, tmp)[0] for k, m in variants.items()}
            for batch in (1, 32):
                xb = np.concatenate([p.data.eval[i][0].numpy()[None] for i in range(batch)])
                res = interleaved_latency(sessions, xb, rounds=args.rounds)
                for k, v in res.items():
                    lat.setdefault(k, {}).setdefault(threads, {})[batch] = v
        sweep = []
        for k, m in variants.items():
            macs = count_macs(m, x1)
            row: dict[str, object] = {
                "variant": k,
                "macs": macs,
                "macs_removed": round(1 - macs / base_macs, 4),
            }
            for threads, by_batch in lat[k].items():
                for batch, v in by_batch.items():
                    b = lat["unpruned"][threads][batch]["p50"]
                    row[f"t{threads}_b{batch}_p50_ms"] = round(v["p50"], 4)
                    row[f"t{threads}_b{batch}_speedup"] = round(b / v["p50"], 3)
            sweep.append(row)
        onnx_bytes = {
            k: onnx_session(m, x1, 1, tmp)[1].stat().st_size
            for k, m in (("unpruned", p.model), ("unstructured", unstructured))
        }
        unstructured_row = {
            "weight_sparsity": round(zeros, 4),
            "onnx_bytes": onnx_bytes,
            "deflate_bytes_unpruned": compressed_size(p.model),
            "deflate_bytes_unstructured": compressed_size(unstructured),
            "accuracy_unpruned": acc(p.model),
            "accuracy": acc(unstructured),
        }
        cols = [("variant", "variant"), ("macs_removed", "MACs removed")]
        for threads in sorted({1, args.threads}):
            for batch in (1, 32):
                cols += [
                    (f"t{threads}_b{batch}_p50_ms", f"{threads}T b{batch} p50 ms"),
                    (f"t{threads}_b{batch}_speedup", "speed-up"),
                ]
        print(table(sweep, cols))
        print(json.dumps(unstructured_row))
        Path(args.sweep_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.sweep_out).write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d"),
                    "machine": machine,
                    "rounds": args.rounds,
                    "latency_sweep": sweep,
                    "unstructured": unstructured_row,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.sweep_out}", flush=True)
    if args.no_distill:
        return

    rows = [
        {
            "model": "unpruned",
            "macs": base_macs,
            "size_bytes": model_size_bytes(p.model),
            "accuracy": acc(p.model),
        }
    ]
    print(f"unpruned: {rows[0]['accuracy']:.4f}, {base_macs / 1e6:.2f} M MACs", flush=True)
    histories = {}
    cfg = DistillConfig(
        epochs=args.epochs, temperature=4.0, alpha=0.7, lr=2e-3, batch_size=128, device="cpu"
    )
    for spec in args.students.split(","):
        s, rt = float(spec.split(":")[0]), int(spec.split(":")[1])
        pruned, secs = prune(s, rt)
        widths = "/".join(str(w) for w in layer_widths(pruned).values())
        rows.append(
            {
                "model": f"target {s:.1%}, x{rt} ({widths})",
                "macs": count_macs(pruned, x1),
                "size_bytes": model_size_bytes(pruned),
                "accuracy": acc(pruned),
                "seconds": round(secs, 1),
            }
        )
        print(
            f"pruned {s:.1%}: {rows[-1]['accuracy']:.4f} in {secs:.0f} s; distilling {args.epochs:g} epochs",
            flush=True,
        )
        result = distill(pruned, p.model, p.data.train, cfg, x1, seed=0)
        histories[spec] = result.history
        rows.append(
            {
                "model": f"  + distilled ({args.epochs:g} epochs)",
                "macs": count_macs(pruned, x1),
                "size_bytes": model_size_bytes(pruned),
                "accuracy": acc(pruned),
                "seconds": round(result.seconds, 1),
            }
        )
        print(f"distilled: {rows[-1]['accuracy']:.4f}", flush=True)
        for r in rows:
            r["macs_removed"] = round(1 - r["macs"] / base_macs, 4)
            r["macs_ratio"] = round(base_macs / r["macs"], 3)
            r["accuracy_delta"] = round(r["accuracy"] - rows[0]["accuracy"], 4)
        result_json = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine,
            "eval_samples": len(p.data.eval),
            "train_samples": len(p.data.train),
            "distill": {
                "epochs": args.epochs,
                "temperature": 4.0,
                "alpha": 0.7,
                "lr": 2e-3,
                "batch_size": 128,
                "history": histories,
            },
            "rows": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result_json, indent=2) + "\n")  # after every student
    print(
        table(
            rows,
            [
                ("model", "model"),
                ("macs", "MACs"),
                ("macs_removed", "MACs removed"),
                ("macs_ratio", "fewer MACs"),
                ("size_bytes", "bytes"),
                ("accuracy", "top-1 (10k)"),
                ("accuracy_delta", "Δ"),
                ("seconds", "s"),
            ],
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
