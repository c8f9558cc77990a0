"""On-device head fine-tuning with the pretrained EfficientNet-Lite0 backbone, on real Fashion-MNIST.

Three measurements, each with its baseline from the same run:

1. numpy vs PyTorch: the same linear head (same initial weights, same standardised features,
   same Adam settings, same mini-batches, same epochs) trained by ``edgesmith.runtime.finetune``
   and by ``torch.optim.Adam``; test top-1 of both and seconds per epoch (ratio numpy / torch).
2. ``edgesmith finetune BUNDLE --data DIR`` in a separate process on 2,000 PNG files (what a
   device runs: no torch imported): wall time, seconds per epoch and peak RSS (``VmHWM`` of that
   process).
3. Incremental: classes 0-4 first, then 5 arriving batches of one new class each, with a bounded
   replay buffer, without one, and joint training on all batches at once (the reference); accuracy
   on the first classes after every batch (10-way, and among the first classes only).

Backbone features are computed once through the runtime and cached (``--cache``): computing
EfficientNet features costs ~5-10 ms per image on this shared 2-core machine.

Run:
    .venv/bin/python benchmarks/finetune_effnet.py [--bundle BUNDLE] [--train 2000] [--test 2000]

``--bundle`` takes any trainable-head bundle (fp32 or, once the quantization work is merged, an
int8 backbone); without it ``examples/efficientnet_lite0/recipe-finetune.yaml`` is built once
into ``benchmarks/.cache/``. Writes benchmarks/results/finetune_effnet.json and
finetune_incremental.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from finetune_effnet_incremental import incremental, plot

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results"
FMNIST = "/usr/share/datasets/fashion-mnist"


def default_bundle() -> Path:
    out = CACHE / "effnet-finetune"
    if not (out / "report.json").exists():
        from edgesmith.pipeline import build
        from edgesmith.recipe import load_recipe

        print("building examples/efficientnet_lite0/recipe-finetune.yaml (once) ...", flush=True)
        build(
            load_recipe(ROOT / "examples/efficientnet_lite0/recipe-finetune.yaml"),
            out,
            force=True,
            bundle_version=1,
        )
    report = json.loads((out / "report.json").read_text())
    return out / report["artifacts"][0]["bundle"]


def subsets(n_train: int, n_test: int, seed: int) -> dict[str, np.ndarray]:
    from edgesmith.data import read_fashion_mnist

    xtr, ytr = read_fashion_mnist(FMNIST, "train")
    xte, yte = read_fashion_mnist(FMNIST, "test")
    rng = np.random.default_rng(seed)
    # the tail of the permutation: examples/efficientnet_lite0/train_head.py trained the shipped
    # head on the first 12,000 of default_rng(0).permutation(60000); these images are unseen
    tr = rng.permutation(len(xtr))[-(n_train + 3000) :]
    te = rng.permutation(len(xte))[:n_test]
    return {
        "x": xtr[tr[:n_train]],
        "y": ytr[tr[:n_train]],
        "x_inc": xtr[tr[n_train:]],  # a disjoint pool for the incremental run
        "y_inc": ytr[tr[n_train:]],
        "xt": xte[te],
        "yt": yte[te],
    }


# --------------------------------------------------------------------------- 1. numpy vs torch


def torch_train(
    start: Any,
    z: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float,
    wd: float,
    batch: int,
    seed: int,
    threads: int,
) -> tuple[Any, float]:
    import torch

    torch.set_num_threads(threads)
    lin = torch.nn.Linear(z.shape[1], start.classes)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(start.params["layers.0.weight"]))
        lin.bias.copy_(torch.from_numpy(start.params["layers.0.bias"]))
    opt = torch.optim.Adam(
        [{"params": [lin.weight], "weight_decay": wd}, {"params": [lin.bias], "weight_decay": 0}],
        lr=lr,
    )
    rng = np.random.default_rng(seed)  # the same batches as the numpy trainer draws
    tz, ty = torch.from_numpy(z), torch.from_numpy(y)
    seconds = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        perm = rng.permutation(len(z))
        for s in range(0, len(z), batch):
            idx = torch.from_numpy(perm[s : s + batch])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(tz[idx]), ty[idx]).backward()
            opt.step()
        seconds.append(time.perf_counter() - t0)
    return lin, float(np.median(seconds))  # the median epoch: no warm-up, robust to load bursts


def numpy_vs_torch(
    f: np.ndarray, y: np.ndarray, ft: np.ndarray, yt: np.ndarray, args: Any
) -> dict[str, Any]:
    import torch

    from edgesmith.runtime.finetune.head import Head, LayerSpec
    from edgesmith.runtime.finetune.training import (
        FinetuneConfig,
        feature_stats,
        init_like,
        train_head,
    )

    shape = Head.from_arrays(
        [LayerSpec(type="linear", in_features=f.shape[1], out_features=10)],
        {"layers.0.weight": np.zeros((10, f.shape[1])), "layers.0.bias": np.zeros(10)},
    )
    start = init_like(shape, np.random.default_rng(args.seed))
    mean, std = feature_stats(f)
    z, zt = ((f - mean) / std).astype(np.float32), ((ft - mean) / std).astype(np.float32)
    cfg = FinetuneConfig(
        epochs=args.epochs,
        batch_size=args.batch,
        optimizer="adam",
        lr=args.lr,
        weight_decay=args.weight_decay,
        balance=False,
        patience=None,
        normalize=False,
        seed=args.seed,
    )
    res = train_head(start, z, y, cfg, description="numpy head")
    np_s = float(np.median([h["seconds"] for h in res.history]))
    np_acc = float((res.head(zt).argmax(1) == yt).mean())
    # PyTorch with 1 and with all threads (on a shared 2-core machine its OpenMP threads can
    # slow it down several times); the faster one is the baseline
    per_threads = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        lin, per_threads[threads] = torch_train(
            start, z, y, args.epochs, args.lr, args.weight_decay, args.batch, args.seed, threads
        )
    torch_s = min(per_threads.values())
    with torch.no_grad():
        torch_acc = float((lin(torch.from_numpy(zt)).argmax(1).numpy() == yt).mean())
        wdiff = float(np.abs(lin.weight.numpy() - res.head.params["layers.0.weight"]).max())
    return {
        "numpy_top1": np_acc,
        "torch_top1": torch_acc,
        "diff_points": 100 * (np_acc - torch_acc),
        "max_weight_diff": wdiff,
        "numpy_s_per_epoch": np_s,
        "torch_s_per_epoch": torch_s,
        "torch_s_per_epoch_by_threads": per_threads,
        "ratio_numpy_over_torch": np_s / torch_s,
        "epochs": args.epochs,
        "train": len(y),
        "test": len(yt),
    }


# --------------------------------------------------------------------------- 2. the CLI, isolated

# peak RSS from VmHWM (this process's own peak); ru_maxrss would include the parent's RSS that
# the forked child had before exec
_RUNNER = """
import json, sys, time
t0 = time.perf_counter()
from edgesmith.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code or 0
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("BENCH " + json.dumps({"code": code, "wall_s": time.perf_counter() - t0,
      "peak_rss_mb": hwm / 1024, "torch_imported": "torch" in sys.modules}), flush=True)
"""


def cli_run(
    bundle: Path, x: np.ndarray, y: np.ndarray, labels: list[str], args: Any
) -> dict[str, Any]:
    from PIL import Image

    from edgesmith.runtime.finetune import label_key

    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        data = Path(tmp) / "data"
        for i, (img, c) in enumerate(zip(x, y, strict=True)):
            d = data / label_key(labels[c])
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:05d}.png")
        out = Path(tmp) / "v2"
        cmd = [
            sys.executable, "-c", _RUNNER, "-q", "finetune", str(bundle), "--data", str(data),
            "-o", str(out), "--json", "--epochs", str(args.epochs), "--lr", str(args.lr),
            "--patience", str(args.epochs),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
        if proc.returncode != 0 or "BENCH " not in proc.stdout:
            raise SystemExit(f"finetune CLI failed:\n{proc.stderr[-3000:]}")
        bench = json.loads(proc.stdout.split("BENCH ", 1)[1])
        doc = json.loads(proc.stdout.split("BENCH ", 1)[0])
    m = doc["metrics"]
    n = doc["trained"]["samples"] + doc["trained"]["holdout_samples"]
    epochs_s = sum(h["seconds"] for h in doc["history"])
    return {
        "command": "edgesmith finetune BUNDLE --data DIR (2,000 PNG files) -o OUT --json",
        "images": n,
        "wall_s": bench["wall_s"],
        "peak_rss_mb": bench["peak_rss_mb"],
        "torch_imported": bench["torch_imported"],
        "s_per_epoch": m["seconds_per_epoch"],
        "training_s": epochs_s,
        "epochs": len(doc["history"]),
        "holdout_accuracy": m["holdout_accuracy"],
        "previous_holdout_accuracy": m["previous_holdout_accuracy"],
        "backbone_runs": m["feature_cache"]["misses"],
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="a trainable-head bundle (default: build recipe-finetune.yaml)",
    )
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--replay", type=int, default=1000, help="replay buffer capacity (samples)")
    ap.add_argument("--distill", type=float, default=2.0, help="distillation weight with replay")
    ap.add_argument("--inc-epochs", type=int, default=30)
    ap.add_argument("--inc-lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seed", type=int, default=0, help="data subsets and the numpy/torch init")
    ap.add_argument("--cache", type=Path, default=CACHE / "features")
    ap.add_argument("--skip-cli", action="store_true", help="skip the separate-process CLI run")
    ap.add_argument("--out", type=Path, default=RESULTS / "finetune_effnet.json")
    args = ap.parse_args()

    from edgesmith.runtime import load
    from edgesmith.runtime.finetune import FeatureCache

    bundle = args.bundle or default_bundle()
    model = load(bundle)
    labels = list(model.labels or [])
    d = subsets(args.train, args.test, args.seed)
    cache = FeatureCache(args.cache)
    t0 = time.perf_counter()
    f = cache.features(model, d["x"], description="features: train")
    ft = cache.features(model, d["xt"], description="features: test")
    f_inc = cache.features(model, d["x_inc"], description="features: incremental pool")
    computed = cache.misses
    cache.save()
    feat_s = time.perf_counter() - t0
    shipped = float((model.head(ft).argmax(1) == d["yt"]).mean())

    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "processor": platform.processor(),
        },
        "command": "python benchmarks/finetune_effnet.py " + " ".join(sys.argv[1:]),
        "bundle": str(bundle),
        "precision": model.info.get("precision"),
        "backbone": model.info.get("file"),
        "feature_size": int(f.shape[1]),
        "features_computed": computed,
        "features_s": feat_s,
        "shipped_head_test_top1": shipped,
    }
    print("numpy vs torch ...", flush=True)
    result["numpy_vs_torch"] = numpy_vs_torch(f, d["y"], ft, d["yt"], args)
    if not args.skip_cli:
        print("edgesmith finetune in a separate process ...", flush=True)
        result["cli"] = cli_run(bundle, d["x"], d["y"], labels, args)
    print("incremental ...", flush=True)
    result["incremental"] = incremental(f_inc, d["y_inc"], ft, d["yt"], labels, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    png = "finetune_incremental.png" if args.out.name == "finetune_effnet.json" else args.out.stem
    plot(result["incremental"], args.out.with_name(png if png.endswith(".png") else png + ".png"))

    nt, inc = result["numpy_vs_torch"], result["incremental"]
    print(f"\nbackbone: {bundle} ({result['precision']}), {result['feature_size']} features")
    print(f"shipped head (build) test top-1 on {args.test}: {shipped:.4f}")
    print(
        "| head training (same init, data, Adam, batches, epochs) | test top-1 | s/epoch (median) |"
    )
    print("|---|---|---|")
    print(
        f"| numpy (edgesmith.runtime.finetune) | {nt['numpy_top1']:.4f} | {nt['numpy_s_per_epoch']:.4f} |"
    )
    print(
        f"| PyTorch (torch.optim.Adam) | {nt['torch_top1']:.4f} | {nt['torch_s_per_epoch']:.4f} |"
    )
    print(
        f"difference {nt['diff_points']:+.2f} points; time ratio numpy/torch {nt['ratio_numpy_over_torch']:.2f}"
    )
    if "cli" in result:
        c = result["cli"]
        print(
            f"CLI: {c['images']} images, {c['wall_s']:.1f} s wall, {c['s_per_epoch']:.4f} s/epoch, "
            f"peak RSS {c['peak_rss_mb']:.0f} MB, torch imported: {c['torch_imported']}"
        )
    print(
        "| step (seed 0) | first classes 10-way: replay / none | among classes 0-4: replay / none |"
    )
    print("|---|---|---|")
    r0 = inc["per_seed"][0]
    for i, (a, b) in enumerate(
        zip(r0["runs"]["replay"]["steps"], r0["runs"]["no_replay"]["steps"], strict=True)
    ):
        print(
            f"| {i} {'+'.join(a['new_classes']) or 'classes 0-4'} | {a['first_classes']:.4f} / {b['first_classes']:.4f} "
            f"| {a['first_classes_among_first']:.4f} / {b['first_classes_among_first']:.4f} |"
        )
    print(
        f"joint training (seed 0): first classes {r0['joint']['first_classes']:.4f} (10-way), "
        f"{r0['joint']['first_classes_among_first']:.4f} (among classes 0-4)"
    )
    for key in ("drop_points_10way", "drop_points_among_first", "drop_points_no_replay_10way"):
        print(f"{key} over seeds {inc['seeds']}: {inc[key]['mean']:.2f} +- {inc[key]['sd']:.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
