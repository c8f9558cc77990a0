"""Is the int8 model worth it here? Interleaved timing against the best non-int8 option.

Timings on a shared machine drift; two models timed one after the other can swap places. Every
comparison here runs the models in alternating rounds and takes the median of the per-round
medians, so a load change hits all of them alike (as ``benchmarks/quantize_formats.py`` does).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgesmith.checks import Check
from edgesmith.progress import echo

if TYPE_CHECKING:
    from edgesmith.export.evaluate import Artifact, Evaluator

__all__ = ["cpu_half_precisions", "interleaved", "make_timer", "speed_verdict"]


def interleaved(
    fns: list[Callable[[], Any]], rounds: int = 5, runs: int = 10, warmup: int = 3
) -> list[float]:
    """Milliseconds per call of each function: the median over ``rounds`` alternating rounds of
    each round's median of ``runs`` calls."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    per: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            per[i].append(float(np.median(ts)))
    return [statistics.median(p) for p in per]


def make_timer(
    threads: int | None,
    x: Any,
    rounds: int = 5,
    runs: int = 10,
    prepare: Callable[[Any], None] | None = None,
) -> Callable[[list[Path]], list[float]]:
    """``timer(paths) -> ms`` at batch 1 on the runtime backend of each file, interleaved
    (``x``: one array, or a list of one per model input; ``prepare(model)`` after loading, such
    as ``Evaluator.declare``: how inputs fit each file)."""

    def timer(paths: list[Path]) -> list[float]:
        from edgesmith.runtime import load

        models = [load(p, threads=threads, device="cpu") for p in paths]
        for m in models:
            if prepare is not None:
                prepare(m)
        feeds = _feeds(x)
        return interleaved([lambda m=m: _call(m, feeds) for m in models], rounds, runs)

    return timer


def _call(model: Any, x: Any) -> Any:
    """``model`` on ``x``: one array, or a list of one per input (see :func:`_feeds`)."""
    return model(*x) if isinstance(x, list | tuple) else model(x)


def _feeds(x: Any) -> Any:
    """``edgesmith.feeds.Samples`` as a list of arrays (once, outside the timed calls)."""
    return x.arrays() if hasattr(x, "arrays") else x


def cpu_half_precisions() -> set[str]:
    """Half-precision arithmetic this CPU runs natively: ``bf16`` (AVX512_BF16 or AMX-BF16),
    ``fp16`` (AVX512_FP16 or AMX-FP16, or Arm's fphp/asimdhp)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[-1].split())
    out = set()
    if flags & {"avx512_bf16", "amx_bf16"}:
        out.add("bf16")
    if flags & {"avx512_fp16", "amx_fp16", "asimdhp"}:
        out.add("fp16")
    return out


def _baselines(fmt: str) -> tuple[list[tuple[str, dict[str, Any]]], str]:
    """The non-int8 ways the backend can run the fp32 file here, and a note on half precision."""
    options: list[tuple[str, dict[str, Any]]] = [("fp32", {})]
    half = cpu_half_precisions()
    if fmt == "openvino":
        import openvino as ov

        caps = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        if "BF16" in caps:
            options.append(("bf16", {"precision": "bf16"}))
        if "FP16" in caps:
            options.append(("fp16", {"precision": "f16"}))
        if len(options) == 1:
            return options, (
                "this CPU has no bf16/fp16 arithmetic (OpenVINO's CPU capabilities lack BF16 and "
                "FP16: no AVX512_BF16, AVX512_FP16 or AMX), so OpenVINO runs fp32 models in fp32"
            )
        return options, "OpenVINO runs fp32 models in " + options[1][0] + " on this CPU by default"
    if half:
        return options, (
            f"this CPU has {'/'.join(sorted(half))} arithmetic, but {fmt}'s CPU kernels here run "
            "float models in fp32"
        )
    return (
        options,
        "this CPU has no bf16/fp16 arithmetic (no AVX512_BF16/FP16, no AMX): fp32 is the fastest float option",
    )


def speed_verdict(
    int8_path: Path,
    fp32_path: Path,
    fmt: str,
    threads: int | None,
    x: Any,
    prepare: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Time the int8 model against every non-int8 option of its backend on this machine.

    Returns:
        ``int8_ms``, each option's ms (``options``), the fastest option (``baseline``,
        ``baseline_ms``), ``ratio`` (int8 time over the baseline's), ``faster``, a ``note`` on half
        precision and a ``recommendation`` when int8 is not faster (else None).
    """
    from edgesmith.runtime import load

    options, note = _baselines(fmt)
    models = [load(int8_path, threads=threads, device="cpu")]
    for _, opts in options:
        models.append(load(fp32_path, threads=threads, device="cpu", options=opts or None))
    for m in models:
        if prepare is not None:
            prepare(m)
    feeds = _feeds(x)
    times = interleaved([lambda m=m: _call(m, feeds) for m in models], rounds=7, runs=15)
    base_i = int(np.argmin(times[1:]))
    name = options[base_i][0]
    ratio = times[0] / times[1 + base_i]
    out: dict[str, Any] = {
        "int8_ms": round(times[0], 4),
        "options": [
            {"precision": n, "ms": round(t, 4)}
            for (n, _), t in zip(options, times[1:], strict=True)
        ],
        "baseline": name,
        "baseline_ms": round(times[1 + base_i], 4),
        "ratio": round(ratio, 3),
        "faster": ratio < 1.0,
        "threads": threads,
        "note": note,
        "recommendation": None,
    }
    if ratio >= 1.0:
        out["recommendation"] = (
            f"int8 is not faster than {name} with {fmt} on this machine "
            f"({times[0]:.3f} vs {times[1 + base_i]:.3f} ms at batch 1): ship the {name} "
            f"{'artifact' if name == 'fp32' else 'variant (add it to the quantize precisions)'}"
        )
    return out


def _speed(
    a: Artifact, fp32: Artifact, ev: Evaluator, require: bool, stage: str
) -> tuple[dict[str, Any], list[Check]]:
    verdict = speed_verdict(
        a.path, fp32.path, a.format, ev.threads, _timing(ev), prepare=getattr(ev, "declare", None)
    )
    if verdict["faster"]:
        return verdict, []
    echo(f"warning: {a.path.name}: {verdict['recommendation']}")
    if not require:
        return verdict, []
    return verdict, [
        Check(
            stage,
            "require_speedup",
            1.0,
            verdict["ratio"],
            False,
            "ship the faster float artifact, or drop require_speedup",
            f"{a.path.name}: require_speedup: {verdict['recommendation']} ({verdict['note']})",
        )
    ]


def _timing(ev: Any) -> Any:
    """The batch-1 inputs an artifact is timed on: the evaluator's (one array per input), else
    its first sample."""
    timing = getattr(ev, "timing", None)
    return timing if timing is not None else ev.inputs[:1]
