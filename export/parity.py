"""Numeric parity between a PyTorch model's outputs and an exported artifact's outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Parity", "compare_outputs", "runtime_outputs"]


@dataclass
class Parity:
    """Agreement of an artifact with the reference over a data set."""

    top1_agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    samples: int
    passed: bool
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "top1_agreement": round(self.top1_agreement, 6),
            "max_abs_diff": float(f"{self.max_abs_diff:.3g}"),
            "mean_abs_diff": float(f"{self.mean_abs_diff:.3g}"),
            "samples": self.samples,
            "passed": self.passed,
        }


def compare_outputs(
    reference: np.ndarray, candidate: np.ndarray, top1_agreement: float, max_abs_diff: float | None
) -> Parity:
    """Compare two output arrays (samples first) against the tolerances."""
    ref = np.asarray(reference, np.float64).reshape(len(reference), -1)
    cand = np.asarray(candidate, np.float64).reshape(len(candidate), -1)
    if ref.shape != cand.shape:
        return Parity(
            0.0,
            float("inf"),
            float("inf"),
            len(ref),
            False,
            f"output shapes differ: {ref.shape} vs {cand.shape}",
        )
    diff = np.abs(ref - cand)
    agree = float((ref.argmax(1) == cand.argmax(1)).mean()) if ref.shape[1] > 1 else 1.0
    mad = float(diff.max()) if diff.size else 0.0
    reasons = []
    if agree < top1_agreement:
        reasons.append(f"top-1 agreement {agree:.4f} < {top1_agreement}")
    if max_abs_diff is not None and not mad <= max_abs_diff:
        reasons.append(f"max abs diff {mad:.3g} > {max_abs_diff:g}")
    return Parity(
        agree,
        mad,
        float(diff.mean()) if diff.size else 0.0,
        len(ref),
        not reasons,
        "; ".join(reasons),
    )


def runtime_outputs(model: Any, batches: Any) -> np.ndarray:
    """Run an ``edgesmith.runtime`` model over an iterable of numpy input batches; concatenate outputs."""
    outs = [np.asarray(model(x) if not isinstance(x, tuple) else model(*x)) for x in batches]
    return np.concatenate(outs) if outs else np.zeros((0,))
