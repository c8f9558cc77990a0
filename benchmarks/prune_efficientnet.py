"""Prune + distil pretrained EfficientNet-Lite0 (Fashion-MNIST head) and measure what it costs.

    python benchmarks/prune_efficientnet.py [--sparsity 0.3] [--epochs 2] [--train 4000] [--eval 2000]
    python benchmarks/prune_efficientnet.py --student distilled.safetensors --eval 10000   # evaluate only

The teacher is the unpruned model (ImageNet backbone, frozen-feature linear head, 83.6% top-1 on
the 10k test set at resolution 112). The student is the same network with ``sparsity`` of its MACs
removed (l2, per layer, multiples of 8), distilled from the teacher on ``--train`` training images
(0: all). Accuracy is on the first ``--eval`` test images (a subset on a CPU: one forward pass is
~10 ms per image here). ONNX Runtime batch-1 latency of teacher and student is measured interleaved.
``--device cuda`` trains and evaluates on a GPU. Writes benchmarks/results/prune_efficientnet.json.
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from prune_common import interleaved_latency, onnx_session, table  # noqa: E402

FACTORY = f"{ROOT / 'examples' / 'efficientnet_lite0' / 'model.py'}:EfficientNetLite0FMNIST"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--train", type=int, default=4000, help="training images (0: all 59,488)")
    ap.add_argument("--eval", type=int, default=2000, help="test images to evaluate on")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.7)
    ap.add_argument("--resolution", type=int, default=112)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--student", help="evaluate this saved student instead of pruning and distilling"
    )
    ap.add_argument("--save", help="write the distilled student here (.safetensors)")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "prune_efficientnet.json")
    )
    args = ap.parse_args()

    from edgesmith.compress.distill import DistillConfig, distill
    from edgesmith.compress.distributed import device as pick_device
    from edgesmith.compress.pruning.structure import save_model
    from edgesmith.compress.pruning.structured import StructuredPruner
    from edgesmith.data import load_datasets
    from edgesmith.measure import count_macs, model_size_bytes
    from edgesmith.models import build_model
    from edgesmith.recipe import DataConfig, InputSpec, ModelConfig

    torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    data = load_datasets(
        DataConfig(
            kind="fashion-mnist",
            path=args.data,
            calibration=512,
            train=args.train or None,
            eval=args.eval,
        ),
        [1, 1, 28, 28],
    )
    x1 = data.eval[0][0][None]

    def spec(weights: str | None = None) -> ModelConfig:
        return ModelConfig(
            factory=FACTORY,
            kwargs={"resolution": args.resolution},
            weights=weights,
            input=InputSpec(shape=[1, 1, 28, 28]),
        )

    @torch.no_grad()
    def acc(m: torch.nn.Module) -> float:
        m.to(dev).eval()
        correct = 0
        for x, y in torch.utils.data.DataLoader(data.eval, batch_size=250):
            correct += int((m(x.to(dev)).argmax(1).cpu() == y).sum())
        m.cpu()
        return correct / len(data.eval)

    teacher = build_model(spec())
    base_macs = count_macs(teacher, x1)
    rows = [
        {
            "model": "EfficientNet-Lite0 (teacher)",
            "macs": base_macs,
            "size_bytes": model_size_bytes(teacher),
            "accuracy": acc(teacher),
        }
    ]
    print(
        f"teacher: {rows[0]['accuracy']:.4f} on {len(data.eval)} test images, {base_macs / 1e6:.1f} M MACs",
        flush=True,
    )
    history = None
    if args.student:
        student = build_model(spec(args.student))
        rows.append(
            {
                "model": f"student {Path(args.student).name}",
                "macs": count_macs(student, x1),
                "size_bytes": model_size_bytes(student),
                "accuracy": acc(student),
            }
        )
    else:
        student = copy.deepcopy(teacher)
        t0 = time.perf_counter()
        pruner = StructuredPruner(student, x1, importance="l2", round_to=8)
        pruner.prune_to_macs(int(base_macs * (1 - args.sparsity)))
        rows.append(
            {
                "model": f"pruned {args.sparsity:.0%} (l2, per layer, x8)",
                "macs": count_macs(student, x1),
                "size_bytes": model_size_bytes(student),
                "accuracy": acc(student),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(
            f"pruned: {rows[-1]['accuracy']:.4f}; distilling on {len(data.train)} images x {args.epochs} epochs on {dev}",
            flush=True,
        )
        cfg = DistillConfig(
            epochs=args.epochs,
            temperature=args.temperature,
            alpha=args.alpha,
            lr=args.lr,
            batch_size=args.batch_size,
            device=args.device,
        )
        result = distill(student, teacher, data.train, cfg, x1, seed=0)
        history = result.history
        rows.append(
            {
                "model": f"pruned {args.sparsity:.0%} + distilled ({args.epochs:g} epochs, {len(data.train)} images)",
                "macs": count_macs(student, x1),
                "size_bytes": model_size_bytes(student),
                "accuracy": acc(student),
                "seconds": round(result.seconds, 1),
            }
        )
        if args.save:
            save_model(student, args.save)
    for r in rows:
        r["macs_removed"] = round(1 - r["macs"] / base_macs, 4)
        r["accuracy_delta"] = round(r["accuracy"] - rows[0]["accuracy"], 4)
    latency = None
    if not args.no_latency:
        tmp = Path(tempfile.mkdtemp())
        sessions = {
            k: onnx_session(m, x1, args.threads, tmp)[0]
            for k, m in (("teacher", teacher), ("student", student))
        }
        lat = interleaved_latency(sessions, x1.numpy(), rounds=3, runs=50)
        latency = {
            "threads": args.threads,
            **lat,
            "speedup": lat["teacher"]["p50"] / lat["student"]["p50"],
        }
    result_json = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "device": str(dev),
            "threads": args.threads,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
        },
        "args": vars(args),
        "eval_samples": len(data.eval),
        "train_samples": len(data.train),
        "rows": rows,
        "history": history,
        "onnxruntime_batch1": latency,
    }
    print(
        table(
            rows,
            [
                ("model", "model"),
                ("macs", "MACs"),
                ("macs_removed", "MACs removed"),
                ("size_bytes", "bytes"),
                ("accuracy", f"top-1 ({len(data.eval)})"),
                ("accuracy_delta", "Δ"),
                ("seconds", "s"),
            ],
        )
    )
    if latency:
        print(
            f"ONNX Runtime batch 1, {args.threads} threads: teacher {latency['teacher']['p50']:.2f} ms, "
            f"student {latency['student']['p50']:.2f} ms ({latency['speedup']:.2f}x)"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result_json, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
