"""The server under overload: what it sustains, and what happens at twice that rate.

A wider SmallCNN (seeded random weights, several ms per sample, so that one httpx client can
offer twice what the server sustains) is served with ``--threads 1 --max-batch 4 --max-queue 16``.
Closed loop at concurrency 16 for ``--seconds`` measures the sustained rate; then an open loop
offers twice that rate for ``--seconds``: requests answered 200 (each checked against direct
inference), shed with 503, or lost (must be none), and p50/p99 latency of the answered ones. A
bounded queue means an answered request waited behind at most ``max_queue + max_batch`` others.
(The default suite proves the shedding and the answers without timing:
``tests/runtime/test_serve_load.py::test_overload_sheds_with_503_and_every_answer_is_right``.)

    .venv/bin/python benchmarks/serve_overload.py [--seconds 2] [--rounds 3]

Writes ``benchmarks/results/serve_overload.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from runtime_reference import RESULTS, ROOT
from serve_batching import _start

MAX_BATCH, MAX_QUEUE = 4, 16


def _wide_model(out: Path) -> Path:
    import torch

    from edgesmith.export.onnx import export

    sys.path.insert(0, str(ROOT / "examples" / "fashion_mnist"))
    from model import SmallCNN  # examples/fashion_mnist/model.py

    torch.manual_seed(0)
    return export(SmallCNN(width=192).eval(), (torch.zeros(1, 1, 28, 28),), out / "wide.onnx")


def _body(x: np.ndarray) -> bytes:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    return json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()


async def _closed_loop(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> list:
    import httpx

    out: list[tuple] = []
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency), timeout=60) as c:

        async def worker(k: int) -> None:
            i = k
            while time.monotonic() < end:
                t = time.perf_counter()
                r = await c.post(url, content=bodies[i % len(bodies)])
                out.append((i % len(bodies), r.status_code, r.json(), time.perf_counter() - t))
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return out


async def _open_loop(url: str, bodies: list[bytes], rate: float, seconds: float) -> tuple:
    """Requests started at a fixed ``rate`` whatever the server does; results and achieved rate."""
    import httpx

    out: list[tuple] = []
    n = int(rate * seconds)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=256), timeout=60) as c:

        async def one(i: int) -> None:
            t = time.perf_counter()
            try:
                r = await c.post(url, content=bodies[i % len(bodies)])
                out.append((i % len(bodies), r.status_code, r.json(), time.perf_counter() - t))
            except httpx.HTTPError as exc:  # a lost request: must not happen
                out.append((i % len(bodies), None, repr(exc), time.perf_counter() - t))

        start = time.monotonic()
        tasks = []
        for i in range(n):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        achieved = n / (time.monotonic() - start)
        await asyncio.gather(*tasks)
    return out, achieved


def _round(url: str, bodies: list[bytes], direct: np.ndarray, seconds: float) -> dict:
    warm = asyncio.run(_closed_loop(url, bodies, 16, seconds))
    sustained = len(warm) / seconds
    results, offered = asyncio.run(_open_loop(url, bodies, 2 * sustained, seconds))
    wrong = 0
    for i, status, doc, _ in results + warm:
        if status == 200:
            out = np.asarray(doc["outputs"][0]["data"], dtype=np.float32)
            wrong += not np.allclose(out, direct[i].ravel(), rtol=1e-4, atol=1e-4)
    lat = np.asarray([r[3] for r in results if r[1] == 200]) * 1e3
    p50, p99 = np.percentile(lat, [50, 99]) if len(lat) else (float("nan"),) * 2
    return {
        "sustained_rps": round(sustained, 1),
        "offered_rps": round(offered, 1),
        "requests": len(results),
        "answered": sum(r[1] == 200 for r in results),
        "shed_503": sum(r[1] == 503 for r in results),
        "lost": sum(r[1] not in (200, 503) for r in results),
        "wrong_answers": int(wrong),
        "p50_ms": round(float(p50), 1),
        "p99_ms": round(float(p99), 1),
        # the bound a bounded queue gives: (max_queue + max_batch) requests ahead, at the sustained rate
        "p99_bound_ms": round(4 * (MAX_QUEUE + MAX_BATCH) / sustained * 1e3 + 1e3, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from edgesmith.runtime import load

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = _wide_model(work)
        x = np.random.default_rng(0).random((48, 1, 28, 28), dtype=np.float32)
        direct = load(model, device="cpu", threads=1)(x)
        bodies = [_body(x[i : i + 1]) for i in range(len(x))]
        opts = ["--threads", "1", "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE)]
        proc, port = _start(model, opts, work)
        try:
            url = f"http://127.0.0.1:{port}/v2/models/wide/infer"
            rounds = [_round(url, bodies, direct, args.seconds) for _ in range(args.rounds)]
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    keys = list(rounds[0])
    print("| round | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for k, r in enumerate(rounds, 1):
        print(f"| {k} | " + " | ".join(str(r[key]) for key in keys) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "max_batch": MAX_BATCH,
        "max_queue": MAX_QUEUE,
        "seconds": args.seconds,
        "rounds": rounds,
    }
    (RESULTS / "serve_overload.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
