"""Numeric parity between a PyTorch model's outputs and an exported artifact's outputs.

Each output is compared by its kind (``edgesmith.runtime.outputs``: top-1 agreement for logits,
cosine and relative L2 for embeddings and features, relative and absolute error for regression)
against the recipe's tolerance for that kind and precision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgesmith.runtime.outputs import failures, measure, score

__all__ = ["OutputParity", "Parity", "compare", "compare_outputs", "runtime_outputs"]


@dataclass
class OutputParity:
    """One output compared with its reference."""

    name: str
    kind: str
    measured: dict[str, float]
    reasons: list[str] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        return score(self.kind, self.measured)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for k, v in self.measured.items():
            out[k] = (
                round(v, 6)
                if k in ("top1_agreement", "mean_cosine", "min_cosine")
                else float(f"{v:.3g}")
            )
        out["passed"] = not self.reasons
        return out


@dataclass
class Parity:
    """Agreement of an artifact with the reference over a data set.

    ``top1_agreement`` is that of the first ``logits`` output (None without one); ``agreement``
    is the score of the first output of any kind (``runtime.outputs.score``); the abs diffs are
    the largest over all outputs. ``outputs`` holds every output's own measures.
    """

    top1_agreement: float | None
    max_abs_diff: float
    mean_abs_diff: float
    samples: int
    passed: bool
    reason: str = ""
    outputs: list[OutputParity] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        if self.outputs:
            return self.outputs[0].agreement
        return self.top1_agreement if self.top1_agreement is not None else 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "top1_agreement": None
            if self.top1_agreement is None
            else round(self.top1_agreement, 6),
            "max_abs_diff": float(f"{self.max_abs_diff:.3g}"),
            "mean_abs_diff": float(f"{self.mean_abs_diff:.3g}"),
            "samples": self.samples,
            "passed": self.passed,
        }
        # a classifier's report keeps its keys; other models say how each output was judged
        if self.outputs and (len(self.outputs) > 1 or self.outputs[0].kind != "logits"):
            first = self.outputs[0].measured
            for key in ("mean_cosine", "min_cosine", "rel_l2"):
                if key in first:
                    out[key] = round(first[key], 6)
            out["outputs"] = {o.name: o.to_json() for o in self.outputs}
        return out


def compare(
    reference: Sequence[Any],
    candidate: Sequence[Any],
    kinds: Sequence[str],
    tolerances: Sequence[Mapping[str, Any]],
    names: Sequence[str] | None = None,
) -> Parity:
    """Compare outputs (one array per output, samples first) output by output, each by its kind
    and tolerance."""
    names = list(names or [f"output_{i}" for i in range(len(kinds))])
    n = len(reference[0]) if len(reference) else 0
    if len(candidate) != len(reference):
        return Parity(
            None,
            float("inf"),
            float("inf"),
            n,
            False,
            f"the artifact gives {len(candidate)} outputs, the PyTorch model {len(reference)}",
        )
    per: list[OutputParity] = []
    for name, kind, tol, ref, cand in zip(
        names, kinds, tolerances, reference, candidate, strict=True
    ):
        try:
            m = measure(kind, ref, cand)
        except ValueError as exc:
            return Parity(None, float("inf"), float("inf"), n, False, f"output '{name}': {exc}")
        per.append(OutputParity(name, kind, m, failures(kind, m, tol)))
    reasons = [(f"output '{o.name}': " if len(per) > 1 else "") + r for o in per for r in o.reasons]
    top1 = next((o.measured["top1_agreement"] for o in per if o.kind == "logits"), None)
    return Parity(
        top1,
        max(o.measured["max_abs_diff"] for o in per) if per else 0.0,
        max(o.measured["mean_abs_diff"] for o in per) if per else 0.0,
        n,
        not reasons,
        "; ".join(reasons),
        per,
    )


def compare_outputs(
    reference: np.ndarray, candidate: np.ndarray, top1_agreement: float, max_abs_diff: float | None
) -> Parity:
    """Compare two class-score arrays (samples first): top-1 agreement and max abs diff."""
    ref = np.asarray(reference)
    cand = np.asarray(candidate)
    if ref.reshape(len(ref), -1).shape != cand.reshape(len(cand), -1).shape:
        return Parity(
            0.0,
            float("inf"),
            float("inf"),
            len(ref),
            False,
            f"output shapes differ: {ref.reshape(len(ref), -1).shape} vs "
            f"{cand.reshape(len(cand), -1).shape}",
        )
    p = compare(
        [ref],
        [cand],
        ["logits"],
        [{"top1_agreement": top1_agreement, "max_abs_diff": max_abs_diff}],
    )
    p.outputs[0].name = "output"
    return p


def runtime_outputs(model: Any, batches: Any) -> np.ndarray:
    """Run an ``edgesmith.runtime`` model over an iterable of numpy input batches; concatenate outputs."""
    outs = [np.asarray(model(x) if not isinstance(x, tuple) else model(*x)) for x in batches]
    return np.concatenate(outs) if outs else np.zeros((0,))
