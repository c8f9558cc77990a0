"""CUDA and TensorRT execution providers through ``load(..., device="cuda"/"tensorrt")``: parity and latency.

For a machine with an NVIDIA GPU and ``onnxruntime-gpu``. For each configuration (CPU baseline,
CUDA, TensorRT fp32, TensorRT fp16) it loads the model through edgesmith, checks which provider
actually runs (a silent fall-back to CPU fails the check), compares the outputs with the CPU on
real Fashion-MNIST test images (top-1 agreement, max abs difference), and times single-stream
latency (batch 1) and offline throughput (batch 256). On a machine without CUDA it says so,
writes ``{"skipped": ...}`` and exits 0.

    .venv/bin/python benchmarks/gpu_providers.py [--model M.onnx] [--images 2000]

Writes ``benchmarks/results/gpu_providers.json``. The pytest counterpart is
``tests/runtime/test_runtime_load.py::test_gpu_providers_match_cpu`` (marker ``gpu``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
from runtime_reference import RESULTS, reference_onnx

from edgesmith.runtime import load
from edgesmith.runtime.bench import time_fn

FMNIST = Path("/usr/share/datasets/fashion-mnist")
PREPROCESS = {
    "channels": "GRAY",
    "layout": "NCHW",
    "mean": [0.286],
    "std": [0.353],
    "scale": 1 / 255,
}


def _images(n: int, fmnist: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
    from edgesmith.data import read_fashion_mnist
    from edgesmith.runtime.specs import TensorSpec, preprocess_images

    if tuple(shape[1:]) == (1, 28, 28) and fmnist.is_dir():
        images, _ = read_fashion_mnist(fmnist, "test")
        spec = TensorSpec("input", ("batch", 1, 28, 28), "float32")
        return preprocess_images(images[:n], PREPROCESS, spec), "fashion-mnist test images"
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, *shape[1:])).astype(np.float32), "seeded random tensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="ONNX file (default: the reference)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--fmnist", type=Path, default=FMNIST, help="Fashion-MNIST IDX folder")
    ap.add_argument("--batch", type=int, default=256, help="offline batch size")
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: results/)")
    ap.add_argument("--runs", type=int, default=500)
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_file = args.out or RESULTS / "gpu_providers.json"
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        msg = f"no CUDAExecutionProvider in this onnxruntime ({', '.join(available)}): nothing to check"
        print(f"skipped: {msg}")
        out_file.write_text(json.dumps({"skipped": msg}, indent=2) + "\n")
        return
    path = args.model or reference_onnx()
    shape = next(
        tuple(d if isinstance(d, int) else 1 for d in i.shape)
        for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()
    )
    x, source = _images(args.images, args.fmnist, shape)
    bs = args.batch
    cache = tempfile.mkdtemp(prefix="trt-cache-")
    trt_opts = {
        "TensorrtExecutionProvider": {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": cache,
        }
    }
    configs = [
        ("cpu", "cpu", {}, "CPUExecutionProvider"),
        ("cuda", "cuda", {}, "CUDAExecutionProvider"),
        ("cuda tf32", "cuda", {"precision": "tf32"}, "CUDAExecutionProvider"),
        ("tensorrt fp32", "tensorrt", {"provider_options": trt_opts}, "TensorrtExecutionProvider"),
        (
            "tensorrt fp16",
            "tensorrt",
            {"provider_options": trt_opts, "precision": "fp16"},
            "TensorrtExecutionProvider",
        ),
    ]
    rows = []
    ref = None
    failed = False
    for name, device, options, want in configs:
        if want not in available:
            rows.append({"config": name, "skipped": f"{want} not in this build"})
            continue
        t0 = time.perf_counter()
        model = load(path, device=device, options=options)
        out = np.concatenate([model(x[i : i + bs]) for i in range(0, len(x), bs)])  # + engines
        load_s = time.perf_counter() - t0
        if ref is None:
            ref = out
        single = time_fn(partial(model, x[:1]), warmup=50, runs=args.runs)
        batch = time_fn(partial(model, x[:bs]), warmup=10, runs=max(20, args.runs // 10))
        provider = model.info["provider"]
        if want == "TensorrtExecutionProvider" and provider != want:
            # onnxruntime-gpu lists TensorRT even where its libraries (libnvinfer) are not installed
            rows.append({"config": name, "skipped": f"TensorRT did not start; ran on {provider}"})
            continue
        ok = provider == want
        failed |= not ok
        row = {
            "config": name,
            "provider": provider,
            "provider_ok": ok,
            "precision": model.info["precision"],
            "load_and_first_pass_s": round(load_s, 2),
            "top1_agreement_vs_cpu": round(float((out.argmax(1) == ref.argmax(1)).mean()), 5),
            "max_abs_diff_vs_cpu": float(np.abs(out - ref).max()),
            "batch1_p50_ms": round(single["p50"], 4),
            "batch1_p99_ms": round(single["p99"], 4),
            "batch": bs,
            "offline_samples_per_s": round(bs * 1e3 / batch["p50"], 1),
        }
        rows.append(row)
    print(f"{path.name} on {len(x)} {source}")
    print(
        f"{'config':15} {'provider':28} {'prec':5} {'top-1 agr':>9} {'max diff':>9} {'b1 p50 ms':>9} {'b1 p99 ms':>9} {'batch/s':>9}"
    )
    for r in rows:
        if "skipped" in r:
            print(f"{r['config']:15} skipped: {r['skipped']}")
            continue
        print(
            f"{r['config']:15} {r['provider']:28} {r['precision']:5} {r['top1_agreement_vs_cpu']:9.4f} "
            f"{r['max_abs_diff_vs_cpu']:9.2e} {r['batch1_p50_ms']:9.3f} {r['batch1_p99_ms']:9.3f} {r['offline_samples_per_s']:9.0f}"
        )
    result = {
        "model": str(path),
        "inputs": source,
        "samples": len(x),
        "onnxruntime": ort.__version__,
        "rows": rows,
    }
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    if failed:
        print("error: a GPU configuration fell back to another provider", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
