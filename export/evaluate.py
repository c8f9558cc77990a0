"""Exported files measured against the PyTorch reference: :class:`Evaluator` makes :class:`Artifact`s.

The build evaluates every exported file (and every variant an artifact hook derives from it) the
same way: loaded with ``edgesmith.runtime``, run over the evaluation set, compared with the
PyTorch outputs (parity), scored with the recipe's metric and timed at batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgesmith.checks import PARITY_HINT, Check
from edgesmith.export.parity import Parity, compare_outputs
from edgesmith.progress import track

if TYPE_CHECKING:
    from edgesmith.metrics import Metric
    from edgesmith.schema import Recipe

__all__ = ["EVAL_BATCH", "Artifact", "Evaluator", "eval_inputs"]

EVAL_BATCH = 256


@dataclass
class Artifact:
    """One exported model file (plus side files) with its measurements."""

    format: str
    precision: str
    path: Path
    files: list[Path]
    size_bytes: int
    accuracy: float
    latency_ms: float
    parity: Parity
    latency: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    bundle: str | None = None
    parity_source: str = ""  # which tolerance applied and where it came from, when not the recipe's

    def parity_check(self) -> Check:
        """The parity tolerance of the recipe, checked on the whole evaluation set."""
        source = f" ({self.parity_source})" if self.parity_source else ""
        return Check(
            "export",
            "parity",
            None,
            None,
            self.parity.passed,
            PARITY_HINT,
            f"{self.path.name}: parity failed: {self.parity.reason}{source}",
        )

    def to_json(self, root: Path) -> dict[str, Any]:
        return {
            "format": self.format,
            "precision": self.precision,
            "path": str(self.path.relative_to(root)),
            "bundle": self.bundle,
            "size_bytes": self.size_bytes,
            "accuracy": round(self.accuracy, 6),
            "latency_ms": round(self.latency_ms, 4),
            "latency": {k: round(v, 4) for k, v in self.latency.items()},
            "parity": self.parity.to_json(),
            **self.extra,
        }


def eval_inputs(dataset: Any) -> np.ndarray:
    """Every input of an evaluation set, stacked."""
    from edgesmith.measure import batches

    return np.concatenate([x for x, _ in batches(dataset, EVAL_BATCH)])


class Evaluator:
    """Measures exported files against the PyTorch reference on the evaluation set."""

    def __init__(
        self,
        recipe: Recipe,
        reference: np.ndarray,
        targets: np.ndarray,
        inputs: np.ndarray,
        metric: Metric,
        threads: int | None,
        head: Any = None,
    ) -> None:
        self.recipe, self.reference, self.targets, self.inputs = recipe, reference, targets, inputs
        self.metric, self.threads = metric, threads
        # trainable_head builds export the backbone: outputs are head(backbone(x)), in numpy
        self.head = head

    def logits(self, model: Any, x: np.ndarray) -> np.ndarray:
        """The artifact's outputs for ``x`` (with the numpy head applied when there is one)."""
        out = np.asarray(model(x))
        return out if self.head is None else self.head(out)

    def evaluate(
        self,
        path: Path,
        fmt: str,
        precision: str,
        files: list[Path] | None = None,
        extra: dict[str, Any] | None = None,
        tolerance: Any = None,
        parity_source: str = "",
    ) -> Artifact:
        """Load ``path`` with the runtime, run the evaluation set, and compare with the reference.

        ``tolerance`` replaces the recipe's parity tolerance for ``precision`` (the int8 contract,
        ``compress/quantize/contract.py``); ``parity_source`` names it in a failure message.
        """
        from edgesmith.runtime import load

        model = load(path, threads=self.threads, device="cpu")
        fixed = model.inputs[0].shape[0]
        step = (
            fixed if isinstance(fixed, int) else EVAL_BATCH
        )  # a model exported with a fixed batch
        outs = [
            self.logits(model, self.inputs[i : i + step])
            for i in track(range(0, len(self.inputs), step), f"evaluate {path.name}")
        ]
        out = np.concatenate(outs)
        tol = tolerance or self.recipe.parity.get(precision) or self.recipe.parity["int8"]
        parity = compare_outputs(self.reference, out, tol.top1_agreement, tol.max_abs_diff)
        accuracy = self.metric(out, self.targets)
        one = self.inputs[:1]
        from edgesmith.runtime.bench import time_fn

        lat = time_fn(lambda: self.logits(model, one), warmup=20, runs=200, max_seconds=15.0)
        if not files:
            from edgesmith.export import EXPORTERS

            files = EXPORTERS[fmt].files(path) if fmt in EXPORTERS else [path]
        return Artifact(
            fmt,
            precision,
            path,
            files,
            sum(f.stat().st_size for f in files),
            accuracy,
            lat["p50"],
            parity,
            latency={k: lat[k] for k in ("p50", "p90", "p99")},
            extra=dict(extra or {}),
            parity_source=parity_source,
        )
