"""Golden data for a bundle's health check: which inputs, and tolerances that hold across CPUs.

A bundle's ``golden.npz`` holds a few evaluation inputs with the outputs the artifact gave on the
build machine; a device must reproduce them within ``atol``/``rtol`` and agree on the top-1 class.
The tolerances are sized for the kernels of other CPUs, not only the build machine's:

- fp32: ``atol = 1e-4 + 1e-4 * max|output|``, ``rtol = 1e-3`` (float summation order);
- other precisions (int8, fp16, ...): ``atol = 0.05 * max|output| + 1e-3``, ``rtol = 0.05``
  (int8 kernels may round requantization differently).

Measured by ``benchmarks/arm64_emulated.py`` (docs/benchmarks.md): ONNX Runtime and LiteRT bundles
built on x86-64 reproduce their golden outputs under emulated Cortex-A72 and Cortex-A76 with fp32
differences near 1e-6 and int8 outputs bit-exact; the manifest says so in ``holds_across``.
Golden samples are chosen so that the top-1 class leads the runner-up by more than twice ``atol``:
an output within tolerance can then never flip the top-1 check.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["GOLDEN_SAMPLES", "HOLDS_ACROSS", "golden_tolerance", "pick_golden"]

GOLDEN_SAMPLES = 8
# CPU architectures whose kernels the tolerances were checked against (benchmarks/arm64_emulated.py)
HOLDS_ACROSS = ["x86_64", "aarch64"]


def golden_tolerance(precision: str, expected: np.ndarray, kind: str = "logits") -> dict[str, Any]:
    """The manifest's ``golden`` tolerances for outputs ``expected`` of a ``precision`` artifact.

    Every kind gets ``atol``/``rtol``; logits also the same top-1 class (``top1``), embeddings and
    features also a cosine floor (``min_cosine``: 0.9999 for fp32, 0.99 otherwise).
    """
    scale = float(np.abs(expected).max()) if expected.size else 1.0
    if precision == "fp32":
        rule: dict[str, Any] = {"atol": 1e-4 + 1e-4 * scale, "rtol": 1e-3}
    else:
        rule = {"atol": 0.05 * scale + 1e-3, "rtol": 0.05}
    rule["top1"] = kind == "logits"
    if kind != "logits":
        rule["kind"] = kind
    if kind in ("embedding", "features"):
        rule["min_cosine"] = 0.9999 if precision == "fp32" else 0.99
    return rule


def pick_golden(
    outputs: np.ndarray, atol: float, n: int = GOLDEN_SAMPLES, logits: bool = True
) -> np.ndarray:
    """Indices of ``n`` samples, in order, whose top-1 output leads the runner-up by > ``2 * atol``.

    Outputs that are not per-sample class scores (one value per sample, or ``logits=False``) keep
    the first ``n``; when fewer than ``n`` samples have such a lead, the ones with the largest
    leads fill the rest.
    """
    flat = outputs.reshape(len(outputs), -1) if outputs.ndim else outputs.reshape(1, 1)
    if flat.shape[1] < 2 or not logits:
        return np.arange(min(n, len(flat)))
    top2 = np.sort(flat, axis=1)[:, -2:]
    lead = top2[:, 1] - top2[:, 0]
    clear = np.flatnonzero(lead > 2 * atol)[:n]
    if len(clear) < n:
        rest = [i for i in np.argsort(-lead, kind="stable") if i not in set(clear)]
        clear = np.sort(np.concatenate([clear, rest[: n - len(clear)]]).astype(int))
    return clear
