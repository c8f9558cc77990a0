"""int8 (and fp16/bf16/weight-only) for ONNX, OpenVINO and TFLite against PyTorch and the peers' defaults.

    python benchmarks/quantize_formats.py [--model fmnist|effnet|both|photos|photos-tflite] [--eval 10000]
                                          [--threads 2] [--precisions int8,fp16,bf16,w8] [--out FILE]

For each reference model, in one run:
  * ``edgesmith build`` with ``quantize: {max_accuracy_drop: 0.005, precisions: [int8, fp16, bf16, w8]}``
    and ``export: [onnx, openvino, tflite]``: accuracy, size, parity, the layers kept float;
  * the peers' default one-liners on the same fp32 files and calibration samples:
    onnxruntime ``quantize_static`` defaults, onnxruntime per-channel U8S8 (the fastest ORT setting
    measured before), ``nncf.quantize`` defaults on the OpenVINO IR, and litert-torch's PT2E int8;
  * latency at batch 1 (p50, p90) of every model file and of PyTorch eager, interleaved over several
    rounds so that the shared machine's load hits all of them alike (median of the per-round values).
Every speed is also given as a ratio: against PyTorch eager fp32 and against the fastest peer
setting on the same backend. Prints a table; writes benchmarks/results/quantize_formats.json.

``photos`` / ``photos-tflite``: the pretrained ImageNet EfficientNet-Lite0 on real photographs
(``examples/imagenet_photos``), each with its recipe's own data split, budget, target and formats
(ONNX and OpenVINO on ``intel-cpu``; TFLite on ``x86-cpu``); the metric is agreement with fp32 top-1.
The build runs with ``keep_going``, so a format that misses its budget is still compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    "fmnist": ROOT / "examples" / "fashion_mnist" / "recipe-fp32.yaml",
    "effnet": ROOT / "examples" / "efficientnet_lite0" / "recipe-int8.yaml",
    "photos": ROOT / "examples" / "imagenet_photos" / "recipe.yaml",
    "photos-tflite": ROOT / "examples" / "imagenet_photos" / "recipe-tflite.yaml",
}
# models whose recipe keeps its own data split, budget, target and formats
OWN_RECIPE = ("photos", "photos-tflite")
BACKEND = {"onnx": "onnxruntime", "openvino": "openvino", "tflite": "litert"}


def peers(
    fmt: str, fp32: Path, model: Any, example: Any, calib: np.ndarray, work: Path
) -> dict[str, Path]:
    """The field's default one-liners for ``fmt``, on our fp32 file (or model) and calibration set."""
    out: dict[str, Path] = {}
    if fmt == "onnx":
        from onnxruntime.quantization import QuantType, quantize_static

        class Reader:
            def __init__(self) -> None:
                self.it = iter(range(len(calib)))

            def get_next(self) -> dict[str, np.ndarray] | None:
                i = next(self.it, None)
                return None if i is None else {"input": calib[i : i + 1]}

        out["ort quantize_static defaults"] = work / "peer-ort-default.onnx"
        quantize_static(str(fp32), str(out["ort quantize_static defaults"]), Reader())
        out["ort per-channel U8S8"] = work / "peer-ort-u8s8.onnx"
        quantize_static(
            str(fp32),
            str(out["ort per-channel U8S8"]),
            Reader(),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    elif fmt == "openvino":
        import nncf
        import openvino as ov

        q = nncf.quantize(
            ov.Core().read_model(str(fp32)),
            nncf.Dataset([calib[i : i + 1] for i in range(len(calib))]),
        )
        out["nncf.quantize defaults"] = work / "peer-nncf.xml"
        ov.save_model(q, str(out["nncf.quantize defaults"]))
    elif fmt == "tflite":
        import litert_torch
        import torch
        from litert_torch.quantize.pt2e_quantizer import (
            PT2EQuantizer,
            get_symmetric_quantization_config,
        )
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = PT2EQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=True)
        )
        prepared = prepare_pt2e(torch.export.export(model.eval(), (example,)).module(), quantizer)
        with torch.no_grad():
            for i in range(len(calib)):
                prepared(torch.from_numpy(calib[i : i + 1]))
        converted = convert_pt2e(prepared, fold_quantize=False)
        out["litert-torch PT2E int8"] = work / "peer-pt2e.tflite"
        litert_torch.convert(
            converted, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer)
        ).export(str(out["litert-torch PT2E int8"]))
    return out


def files_size(path: Path) -> int:
    return sum(p.stat().st_size for p in [path, path.with_suffix(".bin")] if p.exists())


def run_model(key: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from edgesmith.errors import CheckFailed
    from edgesmith.export.parity import compare_outputs
    from edgesmith.pipeline import _eval_inputs, build, prepare
    from edgesmith.progress import echo
    from edgesmith.recipe import dump_recipe, load_recipe, parse_recipe
    from edgesmith.runtime import load

    r = load_recipe(RECIPES[key])
    data = dump_recipe(r)
    own = key in OWN_RECIPE
    if not own:
        data["data"].update(eval=args.eval, calibration=args.calibration)
    options = next((dict(st["quantize"]) for st in data["stages"] if "quantize" in st), {})
    budget = args.budget if args.budget is not None or not own else options["max_accuracy_drop"]
    options.update(
        max_accuracy_drop=0.005 if budget is None else budget,
        precisions=["int8"] if own else args.precisions.split(","),
        search_samples=args.search_samples,
    )
    data["stages"] = [{"quantize": options}]
    if not own:
        data["export"] = ["onnx", "openvino", "tflite"]
    formats = list(data["export"])
    recipe = parse_recipe(data, r.base_dir or ROOT)
    work = Path(tempfile.mkdtemp(prefix=f"qbench-{key}-"))
    t0 = time.perf_counter()
    out = work / "out"
    # PyTorch's passes over the evaluation set (accuracy, not latency) run on one thread: OpenMP
    # barriers with two threads stall whenever another process takes a core on this shared machine
    # (EfficientNet-Lite0 eager: 62 ms per image on 1 thread, 0.3-0.7 s on 2, measured here)
    set_threads = torch.set_num_threads
    torch.set_num_threads = lambda n: set_threads(1)  # type: ignore[assignment]
    try:
        try:
            report = build(recipe, out, bundle_version=1, keep_going=True)
        except CheckFailed as exc:  # a partial build: the formats that passed are written
            if not (out / "report.json").is_file():
                raise
            echo(f"partial build: {exc.message}")
            report = json.loads((out / "report.json").read_text())
        p = prepare(recipe)
    finally:
        torch.set_num_threads = set_threads  # type: ignore[assignment]
    build_s = time.perf_counter() - t0
    inputs = _eval_inputs(p.data.eval)
    targets = np.asarray([int(p.data.eval[i][1]) for i in range(len(p.data.eval))])
    # the peers are compared with an fp32 file (ONNX where built), which agrees with PyTorch to 1e-4
    # (its row)
    fp32_files = [a for a in report["artifacts"] if a["precision"] == "fp32"]
    fp32_file = next((a for a in fp32_files if a["format"] == "onnx"), fp32_files[0])
    m32 = load(out / fp32_file["path"], threads=args.threads, device="cpu")
    fixed = m32.inputs[0].shape[0]
    step = fixed if isinstance(fixed, int) else 256
    ref = np.concatenate(
        [np.asarray(m32(inputs[i : i + step])) for i in range(0, len(inputs), step)]
    )
    calib = np.stack([p.data.calibration[i][0].numpy() for i in range(len(p.data.calibration))])
    base_acc = float(report["baseline"]["accuracy"])
    rows: list[dict[str, Any]] = []
    for a in report["artifacts"]:
        rows.append(
            {
                "format": a["format"],
                "setting": f"edgesmith {a['precision']}",
                "precision": a["precision"],
                "path": out / a["path"],
                "accuracy": a["accuracy"],
                "agreement": a["parity"]["top1_agreement"],
                "size": a["size_bytes"],
                "float_layers": [
                    f["layer"] for f in a.get("quantization", {}).get("float_layers", [])
                ],
            }
        )
    for fmt in formats:
        fp32 = next(
            (r["path"] for r in rows if r["format"] == fmt and r["precision"] == "fp32"), None
        )
        if fp32 is None:  # left out of a partial build
            continue
        try:
            made = peers(fmt, fp32, p.model, p.example, calib[: args.peer_calibration], work)
        except Exception as exc:
            echo(f"peer for {fmt} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            rows.append(
                {
                    "format": fmt,
                    "setting": "peer failed",
                    "precision": "int8",
                    "path": None,
                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                }
            )
            continue
        for name, path in made.items():
            m = load(path, threads=args.threads, device="cpu")
            fixed = m.inputs[0].shape[0]
            step = fixed if isinstance(fixed, int) else 256
            o = np.concatenate(
                [np.asarray(m(inputs[i : i + step])) for i in range(0, len(inputs), step)]
            )
            par = compare_outputs(ref, o, 0.97, None)
            rows.append(
                {
                    "format": fmt,
                    "setting": name,
                    "precision": "int8",
                    "path": path,
                    "accuracy": float((o.argmax(1) == targets).mean()),
                    "agreement": par.top1_agreement,
                    "size": files_size(path),
                }
            )
    # latency: every model, interleaved over rounds
    one = inputs[:1]
    runners: dict[str, Any] = {}
    with torch.inference_mode():
        t_one = torch.from_numpy(one)
        runners["pytorch eager fp32"] = lambda: p.model(t_one)
        runners["pytorch eager fp32 (1 thread)"] = lambda: p.model(t_one)
        for row in rows:
            if row.get("path") is not None:
                m = load(row["path"], threads=args.threads, device="cpu")
                runners[f"{row['format']}|{row['setting']}"] = lambda m=m: m(one)
        samples: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
        for fn in runners.values():
            for _ in range(10):
                fn()
        for _ in range(args.rounds):
            for name, fn in runners.items():
                torch.set_num_threads(1 if name.endswith("(1 thread)") else args.threads)
                ts = []
                for _ in range(args.runs):
                    t = time.perf_counter()
                    fn()
                    ts.append((time.perf_counter() - t) * 1e3)
                samples[name].append((float(np.percentile(ts, 50)), float(np.percentile(ts, 90))))
    lat = {
        k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v))
        for k, v in samples.items()
    }
    torch.set_num_threads(args.threads)
    # "speed vs eager" is against the faster of PyTorch on 1 and on 2 threads
    eager = min(lat["pytorch eager fp32"][0], lat["pytorch eager fp32 (1 thread)"][0])
    for row in rows:
        k = f"{row['format']}|{row['setting']}"
        if k in lat:
            row["p50_ms"], row["p90_ms"] = lat[k]
            row["vs_eager"] = eager / lat[k][0]
    for fmt in formats:
        fmt_rows = [r for r in rows if r["format"] == fmt and "p50_ms" in r]
        fp32 = next((r for r in fmt_rows if r["precision"] == "fp32"), None)
        if fp32 is None:
            continue
        peer_rows = [r for r in fmt_rows if not r["setting"].startswith("edgesmith")]
        fastest = min(peer_rows, key=lambda r: r["p50_ms"]) if peer_rows else None
        for r in fmt_rows:
            r["size_vs_fp32"] = fp32["size"] / r["size"]
            r["time_vs_fp32"] = r["p50_ms"] / fp32["p50_ms"]
            if fastest is not None:
                r["time_vs_fastest_peer"] = r["p50_ms"] / fastest["p50_ms"]
                r["fastest_peer"] = fastest["setting"]
    for r in rows:
        r["path"] = str(r["path"].name) if r.get("path") else None
        if "accuracy" in r:
            r["drop_points"] = (base_acc - r["accuracy"]) * 100
    shutil.rmtree(work, ignore_errors=True)
    return {
        "model": key,
        "recipe": str(RECIPES[key].relative_to(ROOT)),
        "eval_samples": len(inputs),
        "calibration_samples": len(calib),
        "peer_calibration_samples": min(args.peer_calibration, len(calib)),
        "budget": options["max_accuracy_drop"],
        "partial": report.get("partial"),
        "pytorch": {
            "accuracy": base_acc,
            "p50_ms": lat["pytorch eager fp32"][0],
            "p90_ms": lat["pytorch eager fp32"][1],
            "p50_ms_1_thread": lat["pytorch eager fp32 (1 thread)"][0],
            "p90_ms_1_thread": lat["pytorch eager fp32 (1 thread)"][1],
        },
        "build_seconds": round(build_s, 1),
        "rows": rows,
        "stages": report["stages"],
    }


def print_table(res: dict[str, Any]) -> None:
    b = res["pytorch"]
    print(
        f"\n## {res['model']}: PyTorch eager fp32 top-1 {b['accuracy']:.4f}, p50 {b['p50_ms']:.3f} ms, "
        f"p90 {b['p90_ms']:.3f} ms (1 thread: p50 {b['p50_ms_1_thread']:.3f}, p90 {b['p90_ms_1_thread']:.3f}) "
        f"({res['eval_samples']} test images; budget {res['budget'] * 100:.1f} points)"
    )
    print(
        "| format | setting | top-1 | drop (points) | agreement | size | size vs fp32 | p50 ms | p90 ms | "
        "speed vs eager | time vs fp32 | time vs fastest peer | float layers |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in res["rows"]:
        if "error" in r:
            print(f"| {r['format']} | {r['setting']} | {r['error']} |")
            continue
        print(
            f"| {r['format']} | {r['setting']} | {r['accuracy']:.4f} | {r['drop_points']:+.2f} | {r['agreement']:.4f} | "
            f"{r['size'] / 1e6:.2f} MB | {r.get('size_vs_fp32', float('nan')):.2f}x | {r.get('p50_ms', float('nan')):.3f} | "
            f"{r.get('p90_ms', float('nan')):.3f} | {r.get('vs_eager', float('nan')):.1f}x | {r.get('time_vs_fp32', float('nan')):.2f} | "
            f"{r.get('time_vs_fastest_peer', float('nan')):.2f} | {', '.join(r.get('float_layers') or []) or '-'} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", choices=["fmnist", "effnet", "both", *OWN_RECIPE], default="both")
    ap.add_argument("--eval", type=int, default=10000)
    ap.add_argument("--calibration", type=int, default=512)
    ap.add_argument(
        "--peer-calibration",
        type=int,
        default=300,
        help="samples for the peers (nncf's default subset)",
    )
    ap.add_argument("--search-samples", type=int, default=2000)
    ap.add_argument(
        "--budget", type=float, default=None, help="default 0.005 (photos: the recipe's)"
    )
    ap.add_argument(
        "--precisions",
        default="int8,fp16,bf16,w8",
        help="variants to derive, comma-separated (the parity tolerances of the recipe apply)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantize_formats.json"))
    args = ap.parse_args()
    import onnxruntime
    import openvino
    import torch

    results = []
    for key in ["fmnist", "effnet"] if args.model == "both" else [args.model]:
        res = run_model(key, args)
        print_table(res)
        results.append(res)
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "openvino": openvino.__version__,
        },
        "args": vars(args),
        "results": results,
    }
    out = Path(args.out)
    if out.exists() and args.model != "both":  # keep the other model's results
        old = json.loads(out.read_text())
        doc["results"] = [r for r in old.get("results", []) if r["model"] != args.model] + results
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
