"""Nearest against learned rounding before int8 (issue 17), on the pretrained EfficientNet-Lite0 and
real photos (``examples/imagenet_photos``), in every format.

For each rounding the model is bias-corrected in PyTorch once (``compress/quantize/ptq.py``, 64
calibration photos, the stage's defaults), exported, quantized with each format's tool on the 275
calibration photos with no layer kept float (ONNX: onnxruntime per-channel U8S8; OpenVINO: NNCF on a
VNNI target; TFLite: ai-edge-quantizer) and run through ``edgesmith.runtime`` on the 271 held-out
photos. Reported: top-1 agreement with the float model (+-0.026 at 95% on 271 photos: a handful of
photos whose top two classes are nearly tied decide it) and the relative error of the logits,
``||int8 - fp32|| / ||fp32||`` (the steadier measure), plus the time the PyTorch step took. With
``--seeds N`` the PyTorch step is repeated on N different subsets of the calibration photos (mean and
range): learned rounding is a discrete choice, so which photos (and even which thread count) it
fits moves the agreement by a few photos.

    PYTHONPATH=$PWD nice .venv/bin/python benchmarks/ptq_rounding.py [--formats onnx,openvino,tflite]
        [--roundings nearest,learned] [--samples 64] [--seeds 4] [--out benchmarks/results/ptq_rounding.json]

Needs the photos' Debian packages (``examples/imagenet_photos/photos.py``). Prints a table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "imagenet_photos"))

from model import efficientnet_lite0  # noqa: E402
from photos import make_datasets  # noqa: E402

SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "tflite": ".tflite"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default="onnx,openvino,tflite")
    ap.add_argument("--roundings", default="nearest,learned")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="repeat with this many calibration subsets: seed 0 is the stage's (the first "
        "--samples photos), the others a random choice among the calibration photos",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ptq_rounding.json"))
    args = ap.parse_args()

    from edgesmith.compress.quantize import QUANTIZERS
    from edgesmith.compress.quantize.config import Scheme
    from edgesmith.compress.quantize.ptq import apply
    from edgesmith.export import get_exporter
    from edgesmith.runtime import load

    torch.set_num_threads(args.threads)
    calib, _, ev = make_datasets()
    xc, xe = calib.tensors[0].numpy(), ev.tensors[0].numpy()
    net = efficientnet_lite0()
    with torch.no_grad():
        ref = np.concatenate(
            [net(torch.from_numpy(xe[i : i + 64])).numpy() for i in range(0, len(xe), 64)]
        )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in range(args.seeds):
            pick = (
                np.arange(args.samples)
                if seed == 0
                else np.sort(np.random.default_rng(seed).permutation(len(xc))[: args.samples])
            )
            for rounding in args.roundings.split(","):
                t0 = time.perf_counter()
                res = apply(net, xc[pick], samples=args.samples, rounding=rounding)
                seconds = time.perf_counter() - t0
                for fmt in args.formats.split(","):
                    module, name = QUANTIZERS[fmt].split(":")
                    quantizer = getattr(importlib.import_module(module), name)
                    src = work / f"{rounding}-src{SUFFIX[fmt]}"
                    get_exporter(fmt)(res.model.eval(), (torch.from_numpy(xc[:1]),), src)
                    dst = work / f"{rounding}-int8{SUFFIX[fmt]}"
                    quantizer(src, xc, Scheme(vnni=True), work).quantize(dst, [])
                    model = load(dst, threads=args.threads, device="cpu")
                    out = np.concatenate([np.asarray(model(xe[i : i + 1])) for i in range(len(xe))])
                    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
                    rows.append(
                        {
                            "seed": seed,
                            "rounding": rounding,
                            "format": fmt,
                            "agreement": round(float((out.argmax(1) == ref.argmax(1)).mean()), 4),
                            "logit_rel_error": round(float(err), 4),
                            "ptq_seconds": round(seconds, 1),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| format | rounding | top-1 agreement (min-max) | logits' relative error (min-max) | PyTorch step |"
    )
    print("|---|---|---:|---:|---:|")
    for fmt in args.formats.split(","):
        for rounding in args.roundings.split(","):
            mine = [r for r in rows if r["format"] == fmt and r["rounding"] == rounding]
            a = [r["agreement"] for r in mine]
            e = [r["logit_rel_error"] for r in mine]
            t = np.mean([r["ptq_seconds"] for r in mine])
            print(
                f"| {fmt} | {rounding} | {np.mean(a):.4f} ({min(a):.4f}-{max(a):.4f}) "
                f"| {np.mean(e):.4f} ({min(e):.4f}-{max(e):.4f}) | {t:.0f} s |"
            )
    Path(args.out).write_text(json.dumps({"samples": args.samples, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
