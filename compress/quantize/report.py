"""The int8 artifact's ``quantization`` report entry (``hook.py``): what the float-layer search
found, and the bar chart of the layers it ranked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["TOOLS"]

TOOLS = {
    "onnx": "onnxruntime.quantization",
    "openvino": "nncf",
    "tflite": "ai-edge-quantizer",
}


def _info(
    hook: Any,  # the QuantizeHook
    quantizer: Any,
    result: Any,
    ptq: Any,
    contract: Any,
    sensitivity_samples: int,
    seconds: float,
) -> dict[str, Any]:
    """The artifact's ``quantization`` report entry (accuracy, contract and speed added later)."""
    by_id = {layer.id: layer for layer in quantizer.layers}
    costs = {fb.id: fb for fb in result.fallbacks}
    info: dict[str, Any] = {
        "tool": TOOLS[quantizer.format],
        "scheme": hook.scheme.to_json(),
        "calibration_samples": len(hook.calibration),
        "max_accuracy_drop": hook.config.max_accuracy_drop,
        "bias_correction": ptq.to_json() if ptq is not None else hook.ptq_note,
        "layers": len(quantizer.layers),
        "int8_layers": len(quantizer.layers) - len(result.float_layers),
        "float_layers": [
            {
                **by_id[lid].to_json(),
                "extra_bytes": by_id[lid].params * 3,  # float32 instead of int8 weights
                **(costs[lid].to_json() if lid in costs else {"given": True}),
            }
            for lid in result.float_layers
        ],
        "search": {
            "samples": result.measurement.samples,
            "sensitivity_samples": sensitivity_samples,
            "candidates": len(result.trials),
            "accepted": result.accepted,
            "all_int8": {
                "accuracy": round(result.first.accuracy, 6),
                "top1_agreement": round(result.first.agreement, 6),
            },
            "seconds": round(seconds, 1),
        },
    }
    if result.latency_ms:
        info["search"]["latency_ms"] = result.latency_ms
    return info


def _plot_sensitivity(result: Any, by_id: dict[str, Any], out: Path, name: str, fmt: str) -> str:
    """A bar chart of the most sensitive layers (kept-float ones highlighted); returns its file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = result.sensitivity[:25]
    kept = set(result.float_layers)
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(top) + 1.2))
    ax.barh(
        [layer.name for layer, _ in top][::-1],
        [max(noise, 1e-9) for _, noise in top][::-1],
        color=["tab:orange" if layer.id in kept else "tab:blue" for layer, _ in top][::-1],
    )
    ax.set_xscale("log")
    ax.set_xlabel(
        "output noise removed by keeping only this layer float (||q - f||² / ||f||², log)"
    )
    ax.set_title(
        f"{fmt} int8 float-layer candidates: orange = kept float ({len(kept)} of {len(by_id)} layers)"
    )
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path = out / f"{name}-{fmt}-int8-sensitivity.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name
