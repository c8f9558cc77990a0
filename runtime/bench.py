"""``edgesmith bench``: MLPerf-style latency and throughput of one or more models (numpy + stdlib).

Scenarios, after an untimed warm-up:

- single stream: one query of batch 1 at a time; p50/p90/p99 latency (p90 is MLPerf's metric)
  and queries per second;
- offline: all samples available at once, run in batches of ``batch``; samples per second.

Per model also: cold start (process start to first answer, measured from outside), load time,
first-inference time and peak resident memory. Each model runs in its own fresh process so that
these are its own; a thread sweep repeats both scenarios per intra-op thread count. Several models
are compared in one table as ratios against the first. Inputs are random tensors of the model's
shape: speed does not depend on values here, and no accuracy is claimed.

Example:
    >>> report = bench_models(["a.onnx", "b.tflite"], BenchConfig(threads=[1, 2]))   # doctest: +SKIP
    >>> print(render_markdown(report))                                              # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgesmith.errors import EdgesmithError
from edgesmith.text import printable

__all__ = [
    "BenchConfig",
    "bench_model",
    "bench_models",
    "plot_report",
    "render_markdown",
    "time_fn",
]


def time_fn(
    fn: Callable[[], Any],
    warmup: int = 10,
    runs: int = 100,
    min_seconds: float = 0.0,
    max_seconds: float = 30.0,
) -> dict[str, float]:
    """Call ``fn`` repeatedly and report latency percentiles in milliseconds.

    Runs ``warmup`` untimed calls, then at least ``runs`` timed calls (and at least
    ``min_seconds`` of them), stopping early after ``max_seconds``.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and len(times) >= 5:
            break
    ms = np.asarray(times) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "min": float(ms.min()),
        "runs": len(ms),
    }


class BenchConfig(BaseModel):
    """Options of a benchmark run."""

    model_config = ConfigDict(extra="forbid")

    runs: int = Field(default=200, ge=1, description="timed single-stream queries")
    warmup: int = Field(default=20, ge=0, description="untimed queries first")
    batch: int = Field(default=32, ge=1, description="offline scenario batch size")
    offline_seconds: float = Field(default=2.0, gt=0, description="offline scenario duration")
    max_seconds: float = Field(default=20.0, gt=0, description="cap on each single-stream run")
    threads: list[int | None] = Field(default_factory=lambda: list[int | None]([None]))
    device: str = "auto"
    backend: str | None = None
    isolate: bool = Field(default=True, description="each model in a fresh process")


def _inputs(model: Any, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Random inputs of ``batch`` samples: a symbolic dimension the manifest sizes (``dims``:
    a sequence length) at its ``example`` size, other symbolic dimensions at ``batch``; masks
    (bool, or an integer input named ``*mask*``) all ones, other integers (ids) in 0..9: any
    vocabulary holds them."""
    rng = np.random.default_rng(seed)
    rules = getattr(model, "input_rules", {}) or {}
    feeds = []
    for s in model.inputs:
        dims = (rules.get(s.name) or {}).get("dims") or {}
        shape = [
            d
            if isinstance(d, int)
            else int(dims[str(i)]["example"])
            if i > 0 and str(i) in dims and "example" in dims[str(i)]
            else batch
            for i, d in enumerate(s.shape)
        ]
        dt = np.dtype(s.dtype)
        if dt.kind == "f":
            feeds.append(rng.standard_normal(shape).astype(dt))
        elif dt == np.bool_ or "mask" in s.name.lower():
            feeds.append(np.ones(shape, dt))
        else:
            feeds.append(rng.integers(0, 10, shape).astype(dt))
    return feeds


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    On Linux ``VmHWM`` is this process's own high-water mark; ``ru_maxrss`` would also carry the
    parent's resident size at fork time across ``exec``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1 << 20) if sys.platform == "darwin" else kb / 1024


def bench_model(
    path: str | Path, config: BenchConfig, t_spawn: float | None = None
) -> dict[str, Any]:
    """Measure one model in this process (``bench_models`` calls it in a fresh one)."""
    t0 = time.perf_counter()
    from edgesmith.runtime import load

    cfg = config
    model = load(path, device=cfg.device, threads=cfg.threads[0], backend=cfg.backend)
    load_ms = (time.perf_counter() - t0) * 1e3
    one = _inputs(model, 1)
    t1 = time.perf_counter()
    model(*one)
    first_ms = (time.perf_counter() - t1) * 1e3
    first_wall = time.time()
    rows = []
    for i, threads in enumerate(cfg.threads):
        if i > 0:
            model = load(path, device=cfg.device, threads=threads, backend=cfg.backend)
        single = time_fn(partial(model, *one), cfg.warmup, cfg.runs, max_seconds=cfg.max_seconds)
        many = _inputs(model, cfg.batch, seed=1)
        n = int(many[0].shape[0]) if many and many[0].ndim and model.batchable else 1
        for _ in range(max(1, cfg.warmup // 4)):
            model(*many)
        calls = 0
        start = time.perf_counter()
        while calls < 3 or time.perf_counter() - start < cfg.offline_seconds:
            model(*many)
            calls += 1
        elapsed = time.perf_counter() - start
        rows.append(
            {
                "threads": threads,
                "single_stream": {
                    **{k: round(v, 4) for k, v in single.items() if k != "runs"},
                    "runs": single["runs"],
                    "qps": round(1e3 / single["mean"], 2),
                },
                "offline": {
                    "batch": n,
                    "samples_per_s": round(n * calls / elapsed, 2),
                    "batch_ms": round(elapsed / calls * 1e3, 4),
                },
            }
        )
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    if p.suffix == ".xml":
        files.append(p.with_suffix(".bin"))
    return {
        "model": str(path),
        "name": model.name,
        "backend": model.info.get("backend"),
        "provider": model.info.get("provider"),
        "precision": model.info.get("precision"),
        "size_bytes": sum(f.stat().st_size for f in files if f.exists()),
        "load_ms": round(load_ms, 2),
        "first_inference_ms": round(first_ms, 3),
        "cold_start_ms": round((first_wall - t_spawn) * 1e3, 1) if t_spawn else None,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "results": rows,
    }


def _run_isolated(path: str, config: BenchConfig) -> dict[str, Any]:
    t_spawn = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgesmith.runtime.bench",
            str(path),
            config.model_dump_json(),
            repr(t_spawn),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        msg = next((ln for ln in lines if ln.startswith("error:")), lines[-1] if lines else "?")
        raise EdgesmithError(
            f"benchmark of {path} failed: {msg.removeprefix('error: ')}",
            hint="run `edgesmith run` on it to see the problem",
        )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _best(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The thread count with the lowest single-stream p90 (MLPerf's metric), and the one with the most
    offline throughput."""
    single = min(rows, key=lambda r: r["single_stream"]["p90"])
    offline = max(rows, key=lambda r: r["offline"]["samples_per_s"])
    return single, offline


def bench_models(
    paths: list[str | Path],
    config: BenchConfig | None = None,
    progress: Callable[[list[str]], Any] | None = None,
) -> dict[str, Any]:
    """Benchmark several models and compare them against the first.

    Args:
        paths: bundle folders or model files.
        config: scenario options.
        progress: wraps the list of paths (e.g. a progress bar); identity by default.

    Returns:
        The report: machine, config, one entry per model, and ratios against the first model.
    """
    cfg = config or BenchConfig()
    items = [str(p) for p in paths]
    models = []
    for p in progress(items) if progress else items:
        if cfg.isolate:
            models.append(_run_isolated(p, cfg))
        else:
            models.append(bench_model(p, cfg))
    base_single, base_offline = _best(models[0]["results"])
    for m in models:
        single, offline = _best(m["results"])
        m["vs_first"] = {
            "single_stream_speedup": round(
                base_single["single_stream"]["p50"] / single["single_stream"]["p50"], 3
            ),
            "offline_throughput_ratio": round(
                offline["offline"]["samples_per_s"] / base_offline["offline"]["samples_per_s"], 3
            ),
            "size_ratio": round(m["size_bytes"] / max(1, models[0]["size_bytes"]), 3),
            "peak_rss_ratio": round(m["peak_rss_mb"] / max(1e-9, models[0]["peak_rss_mb"]), 3),
        }
    return {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "config": cfg.model_dump(),
        "models": models,
    }


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a comparison table (ratios against the first model) and the thread sweep."""
    lines = [
        "| model | backend / provider | precision | size | cold start | peak RSS | p50 / p90 / p99 ms | queries/s | offline samples/s | speed-up | throughput ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in report["models"]:
        single, offline = _best(m["results"])
        s, o, r = single["single_stream"], offline["offline"], m["vs_first"]
        cold = f"{m['cold_start_ms']:.0f} ms" if m.get("cold_start_ms") is not None else "-"
        lines.append(
            f"| `{printable(Path(m['model']).name)}` | {m['backend']} / {m['provider']} | "
            f"{printable(m['precision'])} "
            f"| {m['size_bytes'] / 1e6:.2f} MB | {cold} | {m['peak_rss_mb']:.0f} MB "
            f"| {s['p50']:.3f} / {s['p90']:.3f} / {s['p99']:.3f} | {s['qps']:.0f} | {o['samples_per_s']:.0f} "
            f"| {r['single_stream_speedup']:.2f}x | {r['offline_throughput_ratio']:.2f}x |"
        )
    lines += [
        "",
        f"Single stream: batch 1, one query at a time; offline: batch {report['config']['batch']}. "
        "Ratios are against the first model (speed-up: its p50 over this p50); each scenario at its best "
        "thread count (single stream: lowest p90, MLPerf's metric).",
        "",
        "| model | threads | p50 ms | p90 ms | p99 ms | queries/s | offline samples/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in report["models"]:
        for row in m["results"]:
            s, o = row["single_stream"], row["offline"]
            lines.append(
                f"| `{Path(m['model']).name}` | {row['threads'] or 'default'} | {s['p50']:.3f} | {s['p90']:.3f} "
                f"| {s['p99']:.3f} | {s['qps']:.0f} | {o['samples_per_s']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Bar charts of single-stream p50 latency and offline throughput per model and thread count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgesmithError("--plot needs matplotlib", hint="pip install matplotlib") from None
    labels, p50, thr = [], [], []
    for m in report["models"]:
        for row in m["results"]:
            labels.append(f"{Path(m['model']).name}\n{row['threads'] or 'default'} thr")
            p50.append(row["single_stream"]["p50"])
            thr.append(row["offline"]["samples_per_s"])
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(labels)), 4.5))
    axes[0].bar(range(len(labels)), p50, color="#4c72b0")
    axes[0].set_ylabel("single-stream p50 latency (ms)")
    axes[1].bar(range(len(labels)), thr, color="#55a868")
    axes[1].set_ylabel(f"offline throughput (samples/s, batch {report['config']['batch']})")
    for ax in axes:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8, rotation=25, ha="right")
    fig.suptitle("edgesmith bench")
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _worker(argv: list[str]) -> None:
    """``python -m edgesmith.runtime.bench PATH CONFIG_JSON T_SPAWN``: one model, JSON on stdout."""
    from edgesmith.errors import EdgesmithError as _Err

    try:
        result = bench_model(argv[0], BenchConfig.model_validate_json(argv[1]), float(argv[2]))
    except _Err as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1:])
