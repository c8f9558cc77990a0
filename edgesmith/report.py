"""The build report: ``report.json`` (DESIGN.md section 9), ``report.md`` and ``report.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgesmith.fsutil import atomic_write_bytes

__all__ = ["print_summary", "render_markdown", "write_plot", "write_report"]


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _m(n: float) -> str:
    return f"{n / 1e6:.1f} M"


def _agreement(p: dict[str, Any]) -> str:
    """The parity column: the first output's top-1 agreement (logits), else its mean cosine
    (embeddings) or relative L2 (regression)."""
    outputs = p.get("outputs") or {}
    first = next(iter(outputs.values()), {}) if isinstance(outputs, dict) else {}
    if first.get("kind") in ("embedding", "features") and first.get("mean_cosine") is not None:
        return f"cos {first['mean_cosine']:.4f}"
    if first.get("kind") == "regression" and first.get("rel_l2") is not None:
        return f"rel L2 {first['rel_l2']:.2g}"
    if p.get("top1_agreement") is not None:
        return f"{p['top1_agreement']:.4f}"
    if p.get("mean_cosine") is not None:
        return f"cos {p['mean_cosine']:.4f}"
    if p.get("rel_l2") is not None:
        return f"rel L2 {p['rel_l2']:.2g}"
    return "n/a"


def render_markdown(report: dict[str, Any], plot: str | None = "report.png") -> str:
    """A human-readable summary of a report."""
    b = report["baseline"]
    lines = [
        f"# {report['name']} → {report['target']}",
        "",
        f"Metric: **{report.get('metric', 'top1')}** on the evaluation set. Latency is batch 1, p50.",
        "",
        "| step | accuracy | MACs | size | latency | seconds |",
        "|---|---:|---:|---:|---:|---:|",
        f"| baseline (PyTorch eager fp32) | {b['accuracy']:.4f} | {_m(b['macs'])} | {_mb(b['size_bytes'])} | {b['latency_ms']:.3f} ms | |",
    ]
    for s in report["stages"]:
        lines.append(
            f"| stage `{s['name']}` | {s['accuracy']:.4f} | {_m(s['macs'])} | {_mb(s['size_bytes'])} | | {s['seconds']:.1f} |"
        )
    lines += [
        "",
        "## Artifacts",
        "",
        "| file | format | precision | accuracy | Δ vs baseline | size | latency p50 / p90 | speed-up | top-1 agreement (or cosine) | max abs diff | bundle |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for a in report["artifacts"]:
        lat = a.get("latency", {})
        speed = b["latency_ms"] / a["latency_ms"] if a["latency_ms"] else float("nan")
        p = a["parity"]
        lines.append(
            f"| `{a['path']}` | {a['format']} | {a['precision']} | {a['accuracy']:.4f} | {a['accuracy'] - b['accuracy']:+.4f} | "
            f"{_mb(a['size_bytes'])} | {lat.get('p50', a['latency_ms']):.3f} / {lat.get('p90', float('nan')):.3f} ms | {speed:.2f}x | "
            f"{_agreement(p)} | {p['max_abs_diff']:.2g} | `{a.get('bundle')}` |"
        )
    lines += _int8_lines(report["artifacts"])
    partial = report.get("partial")
    if partial:
        lines += [
            "",
            "## Partial build",
            "",
            f"Written: {', '.join(partial['formats'])}; left out (failed their checks): "
            f"{', '.join(sorted(partial['dropped']))}.",
        ]
    if report.get("failures"):
        lines += ["", "## Failed checks", ""] + [f"- {f}" for f in report["failures"]]
    if plot:
        lines += ["", f"![accuracy, MACs and latency]({plot})"]
    return "\n".join(lines) + "\n"


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Two panels: accuracy vs MACs over the stages, and accuracy vs latency of every artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = report["baseline"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [b["macs"] / 1e6] + [s["macs"] / 1e6 for s in report["stages"]]
    ys = [b["accuracy"]] + [s["accuracy"] for s in report["stages"]]
    ax1.plot(xs, ys, "-o", color="tab:blue")
    # stages that left the model as it was share a point, and a label
    labels: dict[tuple[float, float], list[str]] = {}
    for x, y, name in zip(
        xs, ys, ["baseline"] + [s["name"] for s in report["stages"]], strict=True
    ):
        labels.setdefault((x, y), []).append(name)
    for (x, y), names in labels.items():
        ax1.annotate(
            ", ".join(names), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax1.set_xlabel("MACs (millions, batch 1)")
    ax1.set_ylabel(f"accuracy ({report.get('metric', 'top1')})")
    ax1.set_title("compression stages")
    ax1.grid(alpha=0.3)
    ax2.scatter(
        [b["latency_ms"]], [b["accuracy"]], marker="s", color="black", label="PyTorch eager fp32"
    )
    colors = {"onnx": "tab:blue", "tflite": "tab:orange", "openvino": "tab:purple"}
    markers = {"fp32": "o", "int8": "^", "fp16": "s", "bf16": "D", "w8": "v"}
    for a in report["artifacts"]:  # a legend, not labels: artifacts of similar speed overlap
        ax2.scatter(
            [a["latency_ms"]],
            [a["accuracy"]],
            color=colors.get(a["format"], "tab:gray"),
            marker=markers.get(a["precision"], "P"),
            s=30 + a["size_bytes"] / max(b["size_bytes"], 1) * 60,
            alpha=0.85,
            label=f"{a['format']} {a['precision']}",
        )
    ax2.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax2.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax2.xaxis.set_minor_formatter(NullFormatter())  # "3x10^-1" labels collide on a short axis
    ax2.set_xlabel("latency, batch 1, p50 (ms, log)")
    ax2.set_title("artifacts (marker area ∝ size)")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="best", fontsize=7, markerscale=0.7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _int8_lines(artifacts: list[dict[str, Any]]) -> list[str]:
    """Per int8 artifact: which check decided, the layers kept float and their cost, the speed."""
    out: list[str] = []
    for a in artifacts:
        q = a.get("quantization")
        if not q or "accuracy_contract" not in q:
            continue
        c, speed = q["accuracy_contract"], q.get("speed", {})
        par = c["parity"]
        out += [
            "",
            f"### `{a['path']}`",
            "",
            f"- accuracy gate: {c['gate']} (max_accuracy_drop {c['max_accuracy_drop']}); int8 "
            f"parity: top-1 agreement >= {par['top1_agreement']} ({par['source']}); decided by: "
            f"{c['decided_by']}",
            f"- layers kept float: {len(q['float_layers'])} of {q['layers']}"
            + "".join(_fallback(f) for f in q["float_layers"]),
        ]
        if speed:
            out.append(
                f"- speed: {speed['ratio']:.2f}x the time of {speed['baseline']} "
                f"({speed['int8_ms']:.3f} ms, {speed.get('threads')} threads, interleaved); "
                + (speed.get("recommendation") or "faster than every float option")
                + f"; {speed['note']}"
            )
    return out


def _fallback(f: dict[str, Any]) -> str:
    if f.get("given"):
        return f"; `{f['layer']}` (given in float_layers)"
    ms = f.get("latency_cost_ms")
    cost = "latency not measured" if ms is None else f"{ms:+.3f} ms"
    return (
        f"; `{f['layer']}` (+{f.get('accuracy_gain', 0) * 100:.2f} points, {cost}, "
        f"+{f['extra_bytes'] / 1e3:.0f} kB)"
    )


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write report.json, report.png and report.md into ``out``."""
    write_plot(report, out / "report.png")
    atomic_write_bytes(
        out / "report.json", (json.dumps(report, indent=2, allow_nan=False) + "\n").encode()
    )
    atomic_write_bytes(out / "report.md", render_markdown(report).encode())


def print_summary(report: dict[str, Any]) -> None:
    """The report's table on stderr (what the build commands show at the end), unless quiet."""
    import logging

    from edgesmith.progress import echo

    if not logging.getLogger().isEnabledFor(logging.ERROR):
        return
    echo(render_markdown(report, plot=None))
