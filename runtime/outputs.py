"""What a model output is, and how two versions of it are compared (numpy only).

The one home of the comparison rules: the build's parity check and int8 search, a bundle's golden
check in ``edgesmith serve`` and the OTA health check all call these functions, so a device judges
a bundle exactly as the build did.

========================  ==========================================  ===============================
kind                      measures                                    checks (tolerance keys)
========================  ==========================================  ===============================
``logits``                top-1 agreement, max/mean abs diff          ``top1_agreement``, ``max_abs_diff``
``embedding``/``features``  mean/min cosine, relative L2, max abs diff  ``mean_cosine``, ``min_cosine``, ``max_rel_l2``
``regression``            max/mean abs diff, relative L2              ``max_rel_l2``, ``max_abs_error``
========================  ==========================================  ===============================

Relative L2 is ``||candidate - reference|| / ||reference||`` over the whole set. Only ``logits``
are ever compared by their argmax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "KINDS",
    "TOLERANCE_KEYS",
    "GoldenResult",
    "compare_golden_outputs",
    "failures",
    "golden_arrays",
    "measure",
    "score",
]

KINDS = ("logits", "embedding", "features", "regression")
# the tolerance keys each kind is checked with (a None value checks nothing)
TOLERANCE_KEYS: dict[str, tuple[str, ...]] = {
    "logits": ("top1_agreement", "max_abs_diff"),
    "embedding": ("mean_cosine", "min_cosine", "max_rel_l2"),
    "features": ("mean_cosine", "min_cosine", "max_rel_l2"),
    "regression": ("max_rel_l2", "max_abs_error"),
}
# key -> (measure it bounds, True when the measure must be at least the limit)
_BOUNDS: dict[str, tuple[str, bool]] = {
    "top1_agreement": ("top1_agreement", True),
    "max_abs_diff": ("max_abs_diff", False),
    "mean_cosine": ("mean_cosine", True),
    "min_cosine": ("min_cosine", True),
    "max_rel_l2": ("rel_l2", False),
    "max_abs_error": ("max_abs_diff", False),
}
_LABELS = {
    "top1_agreement": "top-1 agreement",
    "max_abs_diff": "max abs diff",
    "mean_cosine": "mean cosine",
    "min_cosine": "min cosine",
    "rel_l2": "relative L2",
}


def _flat(x: Any) -> np.ndarray:
    a = np.asarray(x, np.float64)
    return a.reshape(len(a), -1) if a.ndim else a.reshape(1, 1)


def _cosines(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    num = (ref * cand).sum(1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    # two zero vectors are the same vector; one zero vector is unlike any other
    both_zero = den == 0
    out = np.where(both_zero, 0.0, num / np.where(both_zero, 1.0, den))
    same = both_zero & (np.abs(ref - cand).max(1) == 0)
    return np.where(same, 1.0, out)


def measure(kind: str, reference: Any, candidate: Any) -> dict[str, float]:
    """The measures of ``kind`` comparing ``candidate`` with ``reference`` (samples first).

    Raises:
        ValueError: unknown kind, or arrays of different shapes.
    """
    if kind not in TOLERANCE_KEYS:
        raise ValueError(f"unknown output kind '{kind}' (known: {', '.join(KINDS)})")
    ref, cand = _flat(reference), _flat(candidate)
    if ref.shape != cand.shape:
        raise ValueError(f"output shapes differ: {list(ref.shape)} vs {list(cand.shape)}")
    diff = np.abs(ref - cand)
    out = {
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
    }
    if kind == "logits":
        agree = (ref.argmax(1) == cand.argmax(1)).mean() if ref.shape[1] > 1 and len(ref) else 1.0
        out["top1_agreement"] = float(agree)
        return out
    norm = float(np.linalg.norm(ref))
    err = float(np.linalg.norm(ref - cand))
    out["rel_l2"] = err / norm if norm > 0 else (0.0 if err == 0 else float("inf"))
    if kind in ("embedding", "features") and len(ref):
        cos = _cosines(ref, cand)
        out["mean_cosine"], out["min_cosine"] = float(cos.mean()), float(cos.min())
    return out


def failures(kind: str, measured: Mapping[str, float], tolerance: Mapping[str, Any]) -> list[str]:
    """Why ``measured`` misses ``tolerance`` (the keys of ``kind`` only); empty when it holds."""
    out = []
    for key in TOLERANCE_KEYS[kind]:
        limit = tolerance.get(key)
        if limit is None:
            continue
        name, at_least = _BOUNDS[key]
        value = measured.get(name)
        if value is None:
            continue
        label = _LABELS.get(name, name)
        if at_least and not value >= limit:
            out.append(f"{label} {value:.4f} < {limit}")
        elif not at_least and not value <= limit:
            out.append(f"{label} {value:.3g} > {limit:g}")
    return out


def score(kind: str, measured: Mapping[str, float]) -> float:
    """One agreement figure in [0, 1] per kind (higher is better), for ranking candidates:
    top-1 agreement, mean cosine, or ``1 - relative L2``."""
    if kind == "logits":
        return float(measured.get("top1_agreement", 0.0))
    if kind in ("embedding", "features"):
        return float(measured.get("mean_cosine", 0.0))
    return float(max(0.0, 1.0 - measured.get("rel_l2", 1.0)))


# --------------------------------------------------------------------------- golden data


@dataclass
class GoldenResult:
    """A model's outputs on a bundle's golden inputs against the expected ones."""

    ok: bool
    reason: str = ""
    max_abs_diff: float | None = None
    top1_agreement: float | None = None
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)


def golden_arrays(
    data: Mapping[str, np.ndarray], inputs: Sequence[str], outputs: Sequence[str]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The golden inputs and expected outputs of a ``golden.npz`` (an ``np.load`` result), in
    model order: ``inputs``/``outputs`` for one input and one output, else ``inputs/<name>`` and
    ``outputs/<name>``.

    Raises:
        KeyError: an array the model needs is missing.
    """
    if "inputs" in data and len(inputs) == 1:
        ins = [np.asarray(data["inputs"])]
    else:
        ins = [np.asarray(data[f"inputs/{n}"]) for n in inputs]
    if "outputs" in data and len(outputs) == 1:
        outs = [np.asarray(data["outputs"])]
    else:
        outs = [np.asarray(data[f"outputs/{n}"]) for n in outputs]
    return ins, outs


def _rules(golden: Mapping[str, Any], names: Sequence[str]) -> list[dict[str, Any]]:
    """Per-output golden rules: ``golden.outputs`` entries by name, else the top-level ones."""
    per = {str(r.get("name")): r for r in golden.get("outputs") or [] if isinstance(r, dict)}
    base = {k: golden[k] for k in ("atol", "rtol", "top1", "min_cosine") if k in golden}
    return [{**base, **per.get(n, {})} for n in names]


def compare_golden_outputs(
    got: Sequence[Any], expected: Sequence[Any], golden: Mapping[str, Any], names: Sequence[str]
) -> GoldenResult:
    """Whether outputs ``got`` reproduce the golden ``expected`` ones (both in model order) within
    the manifest's ``golden`` tolerances: ``atol``/``rtol`` for every output, the same top-1 class
    where ``top1`` is set (logits), a cosine of at least ``min_cosine`` where set (embeddings).
    Per-output rules live in ``golden.outputs`` (``[{name, kind, atol, rtol, ...}]``)."""
    if len(got) != len(expected):
        return GoldenResult(
            False, f"the model gives {len(got)} outputs, golden data has {len(expected)}"
        )
    result = GoldenResult(True)
    worst = 0.0
    for name, rule, out, want in zip(names, _rules(golden, names), got, expected, strict=True):
        out, want = np.asarray(out), np.asarray(want)
        label = f"output '{name}'" if len(names) > 1 else "golden outputs"
        if out.shape != want.shape:
            return GoldenResult(
                False, f"{label}: shape {list(out.shape)}, expected {list(want.shape)}"
            )
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            return GoldenResult(False, f"{label}: NaN or Inf on the golden inputs")
        kind = "logits" if rule.get("top1") else str(rule.get("kind") or "regression")
        m = measure(kind if kind in TOLERANCE_KEYS else "regression", want, out)
        result.outputs[name] = m
        worst = max(worst, m["max_abs_diff"])
        if rule.get("top1") and out.ndim >= 2:
            result.top1_agreement = min(result.top1_agreement or 1.0, m.get("top1_agreement", 1.0))
        atol, rtol = float(rule.get("atol", 1e-4)), float(rule.get("rtol", 1e-3))
        if not np.allclose(out, want, atol=atol, rtol=rtol):
            result.ok = False
            result.reason = (
                f"{label} differ by up to {m['max_abs_diff']:.4g} "
                f"(tolerance atol {atol:.3g}, rtol {rtol:.3g})"
            )
            break
        if rule.get("top1") and out.ndim >= 2 and m.get("top1_agreement", 1.0) < 1:
            result.ok = False
            result.reason = f"{label}: top-1 agreement {m['top1_agreement']:.3f} < 1"
            break
        least = rule.get("min_cosine")
        if least is not None and "min_cosine" in m and m["min_cosine"] < float(least):
            result.ok = False
            result.reason = f"{label}: cosine {m['min_cosine']:.5f} < {float(least):g}"
            break
    result.max_abs_diff = worst
    return result
