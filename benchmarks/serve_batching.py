"""Server throughput with and without micro-batching at a fixed client concurrency.

Target (issue 6): at concurrency 8 on the reference model, throughput with micro-batching >= 2x
throughput without it (``--max-batch 1``), p99 reported. The same ``edgesmith serve`` process
options are used for both except the batching ones; the two configurations alternate for
``--rounds`` rounds (the machine is shared and noisy) and the figure is the median of the per-round
ratios. Load comes from a lean keep-alive HTTP/1.1 client in a separate process (pre-serialised
JSON bodies, one parse of each response every 25 for a correctness check against direct
inference), so that the client is not the bottleneck; ``--client httpx`` uses httpx instead.
Server CPU time per request is read from /proc.

    .venv/bin/python benchmarks/serve_batching.py [--concurrency 8] [--seconds 5] [--rounds 3]

Writes ``benchmarks/results/serve_batching.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from runtime_reference import RESULTS, reference_bundle

from edgesmith.runtime import load


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start(bundle: Path, args: list[str], workdir: Path) -> tuple[subprocess.Popen, int]:
    ready = workdir / f"port-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "edgesmith", "-q", "serve", str(bundle), "--port", "0"]
    proc = subprocess.Popen([*cmd, "--ready-file", str(ready), *args], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not ready.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return proc, int(ready.read_text())


async def _raw_load(port: int, path: str, bodies: list[bytes], concurrency: int, seconds: float):
    reqs = [
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(b)}\r\n\r\n".encode()
        + b
        for b in bodies
    ]
    lat: list[float] = []
    codes: dict[int, int] = {}
    checks: list[tuple[int, bytes]] = []
    end = time.monotonic() + seconds

    async def worker(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        while time.monotonic() < end:
            t = time.perf_counter()
            writer.write(reqs[i % len(reqs)])
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(h.split(b":")[1])
                for h in head.split(b"\r\n")
                if h.lower().startswith(b"content-length")
            )
            body = await reader.readexactly(length)
            lat.append(time.perf_counter() - t)
            code = int(head.split(b" ", 2)[1])
            codes[code] = codes.get(code, 0) + 1
            if len(lat) % 25 == 0:
                checks.append((i % len(reqs), body))
            i += concurrency
        writer.close()

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return lat, codes, checks


async def _httpx_load(port: int, path: str, bodies: list[bytes], concurrency: int, seconds: float):
    import httpx

    lat: list[float] = []
    codes: dict[int, int] = {}
    checks: list[tuple[int, bytes]] = []
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=httpx.Limits(max_connections=concurrency)
    ) as c:

        async def worker(k: int) -> None:
            i = k
            while time.monotonic() < end:
                t = time.perf_counter()
                r = await c.post(
                    path,
                    content=bodies[i % len(bodies)],
                    headers={"Content-Type": "application/json"},
                )
                lat.append(time.perf_counter() - t)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                if len(lat) % 25 == 0:
                    checks.append((i % len(bodies), r.content))
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return lat, codes, checks


def _client_main(argv: list[str]) -> None:
    """Runs in its own process: ``--client-run PORT PATH BODIES.json CONC SECONDS KIND``."""
    port, path, bodies_file, conc, seconds, kind = argv
    bodies = [b.encode() for b in json.loads(Path(bodies_file).read_text())]
    run = _raw_load if kind == "raw" else _httpx_load
    lat, codes, checks = asyncio.run(run(int(port), path, bodies, int(conc), float(seconds)))
    print(json.dumps({"lat": lat, "codes": codes, "checks": [(i, b.decode()) for i, b in checks]}))


def _measure(bundle, server_args, bodies_file, args, workdir, direct):  # type: ignore[no-untyped-def]
    proc, port = _start(bundle, server_args, workdir)
    path = "/v2/models/fmnist-cnn/infer"
    client = [
        sys.executable,
        __file__,
        "--client-run",
        str(port),
        path,
        str(bodies_file),
        str(args.concurrency),
    ]
    try:
        subprocess.run([*client, "1", args.client], check=True, capture_output=True)  # warm-up
        cpu0 = _cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        out = subprocess.run(
            [*client, str(args.seconds), args.client], check=True, capture_output=True, text=True
        )
        elapsed = time.perf_counter() - t0
        cpu = _cpu_seconds(proc.pid) - cpu0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    res = json.loads(out.stdout)
    lat = np.asarray(res["lat"]) * 1e3
    for i, body in res["checks"]:
        doc = json.loads(body)
        got = np.asarray(doc["outputs"][0]["data"], np.float32)
        assert np.abs(got - direct[i]).max() < 1e-4, "a response does not match direct inference"
    n = len(lat)
    return {
        "requests": n,
        "codes": res["codes"],
        "throughput_rps": round(n / args.seconds, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "server_cpu_ms_per_request": round(cpu / n * 1e3, 3),
        "checked_responses": len(res["checks"]),
        "wall_s": round(elapsed, 2),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client-run":
        _client_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="default: the reference bundle")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1, help="model intra-op threads (both configs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw")
    args = ap.parse_args()
    bundle = args.bundle or reference_bundle()

    model = load(bundle, device=args.device)
    rng = np.random.default_rng(0)
    x = rng.random((64, 1, 28, 28), dtype=np.float32)
    direct = model(x)
    bodies = [
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 1, 28, 28],
                        "datatype": "FP32",
                        "data": x[i].ravel().tolist(),
                    }
                ]
            }
        )
        for i in range(len(x))
    ]
    common = ["--threads", str(args.threads), "--device", args.device]
    configs = {
        "no_batching": [*common, "--max-batch", "1"],
        "micro_batching": [
            *common,
            "--max-batch",
            str(args.max_batch),
            "--max-wait-ms",
            str(args.max_wait_ms),
        ],
    }
    rounds: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        bodies_file = Path(tmp) / "bodies.json"
        bodies_file.write_text(json.dumps(bodies))
        for r in range(args.rounds):
            row = {}
            for name, server_args in configs.items():
                row[name] = _measure(bundle, server_args, bodies_file, args, Path(tmp), direct)
                m = row[name]
                print(
                    f"round {r + 1} {name:15} {m['throughput_rps']:8.1f} req/s  p50 {m['p50_ms']:6.2f} ms  "
                    f"p99 {m['p99_ms']:7.2f} ms  server CPU {m['server_cpu_ms_per_request']:.3f} ms/req  {m['codes']}"
                )
            rounds.append(row)
    ratios = [
        r["micro_batching"]["throughput_rps"] / r["no_batching"]["throughput_rps"] for r in rounds
    ]
    ratio = float(np.median(ratios))
    summary = {
        name: {
            k: float(np.median([r[name][k] for r in rounds]))
            for k in ("throughput_rps", "p50_ms", "p99_ms", "server_cpu_ms_per_request")
        }
        for name in configs
    }
    result = {
        "bundle": str(bundle),
        "concurrency": args.concurrency,
        "client": args.client,
        "configs": configs,
        "rounds": rounds,
        "median": summary,
        "throughput_ratio_per_round": [round(r, 3) for r in ratios],
        "throughput_ratio_median": round(ratio, 3),
        "target": {"min_ratio": 2.0, "met": ratio >= 2.0},
    }
    print(
        f"\nmicro-batching vs none at concurrency {args.concurrency}: {ratio:.2f}x throughput "
        f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}); p99 {summary['micro_batching']['p99_ms']:.1f} ms "
        f"vs {summary['no_batching']['p99_ms']:.1f} ms (target >= 2x)"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_batching.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
