"""Nearest against learned rounding before int8 (issue 17), on the pretrained EfficientNet-Lite0 and
real photos (``examples/imagenet_photos``), in every format.

For each rounding the model is bias-corrected in PyTorch once (``compress/quantize/ptq.py``, 64
calibration photos, the stage's defaults), exported, quantized with each format's tool on the 275
calibration photos with no layer kept float (ONNX: onnxruntime per-channel U8S8; OpenVINO: NNCF on a
VNNI target; TFLite: ai-edge-quantizer) and run through ``edgesmith.runtime`` on the 271 held-out
photos. Reported: top-1 agreement with the float model (+-0.026 at 95% on 271 photos: a handful of
photos whose top two classes are nearly tied decide it) and the relative error of the logits,
``||int8 - fp32|| / ||fp32||`` (the steadier measure), plus the time the PyTorch step took.

    PYTHONPATH=$PWD nice .venv/bin/python benchmarks/ptq_rounding.py [--formats onnx,openvino,tflite]
        [--roundings nearest,learned] [--samples 64] [--out benchmarks/results/ptq_rounding.json]

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
        for rounding in args.roundings.split(","):
            t0 = time.perf_counter()
            res = apply(net, xc, samples=args.samples, rounding=rounding)
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
                rows.append(
                    {
                        "rounding": rounding,
                        "format": fmt,
                        "agreement": round(float((out.argmax(1) == ref.argmax(1)).mean()), 4),
                        "logit_rel_error": round(
                            float(np.linalg.norm(out - ref) / np.linalg.norm(ref)), 4
                        ),
                        "ptq_seconds": round(seconds, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    print("\n| format | rounding | top-1 agreement | logits' relative error | PyTorch step |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['format']} | {r['rounding']} | {r['agreement']:.4f} | {r['logit_rel_error']:.4f} "
            f"| {r['ptq_seconds']:.0f} s |"
        )
    Path(args.out).write_text(json.dumps({"samples": args.samples, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
