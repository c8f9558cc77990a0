"""Accuracy-aware mixed precision, for any format: keep the fewest layers float within the budget.

1. Quantize everything; if the metric drop and the int8 parity tolerance hold, stop.
2. Sensitivity: quantize one layer at a time (the rest float) and measure the output noise it
   causes (energy of the difference to the float outputs over the energy of the float outputs);
   rank layers by that. Measured alone, a layer's error is not masked by a worse layer's.
3. Walk down the ranking, keeping 1, 2, 3, ... layers float, until the budget holds on the search
   samples (and on the whole evaluation set, when that is larger).
4. Refine: try quantizing each kept layer again, least sensitive first; what still holds stays int8.
   The drop measured with a layer quantized again is that layer's accuracy cost.
5. If no candidate held on the search samples, the best one is measured on the whole evaluation
   set, where the budget is defined; it is accepted if it holds there.

A format only has to provide ``Quantizer.layers`` and ``Quantizer.quantize(path, float_layers)``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.compress.quantize.base import Layer, Quantizer
from edgesmith.progress import echo, track

__all__ = ["Measurement", "Probe", "SearchResult", "search"]

log = logging.getLogger(__name__)


@dataclass
class Measurement:
    """A candidate model measured on a sample of the evaluation set."""

    accuracy: float
    base_accuracy: float
    agreement: float  # top-1 agreement (logits), mean cosine (embeddings), 1 - relative L2
    noise: float  # ||q - f||^2 / ||f||^2 over the outputs
    samples: int
    parity_ok: bool
    parity_reason: str = ""
    label: str = "top-1 agreement"  # what ``agreement`` is, for messages

    @property
    def drop(self) -> float:
        return self.base_accuracy - self.accuracy


class Probe:
    """Runs model files on fixed inputs and compares them with the float model's outputs.

    Args:
        inputs / reference / targets: the samples (one array, or ``edgesmith.feeds.Samples``), the
            float model's outputs on them (one array, or a dict by output name), the targets.
        metric: the recipe's metric, ``metric(outputs, targets) -> float``.
        tolerance: the int8 parity tolerance: a ``ParityTolerance`` (one logits output), or one
            mapping per output (``Evaluator.tolerances``), each judged by its kind.
        threads: runtime threads.
        head: applied to the model file's outputs (a trainable-head build quantizes the backbone;
            its outputs are compared as ``head(backbone(x))``).
        evaluator: the build's ``Evaluator``: output names and kinds, how inputs are fed to a
            file (names, TFLite's fixed length).
    """

    def __init__(
        self,
        inputs: Any,
        reference: Any,
        targets: Any,
        metric: Callable[[Any, Any], float],
        tolerance: Any,
        threads: int | None,
        head: Callable[[np.ndarray], np.ndarray] | None = None,
        evaluator: Any = None,
    ) -> None:
        from edgesmith.feeds import Samples, output_list

        self.inputs, self.reference, self.targets = Samples.of(inputs), reference, targets
        self.metric, self.tolerance, self.threads = metric, tolerance, threads
        self.head, self.ev = head, evaluator
        self.names = list(evaluator.info.names) if evaluator is not None else ["output"]
        self.kinds = list(evaluator.info.kinds) if evaluator is not None else ["logits"]
        self.tolerances = (
            list(tolerance)
            if isinstance(tolerance, list | tuple)
            else [
                {"top1_agreement": tolerance.top1_agreement, "max_abs_diff": tolerance.max_abs_diff}
            ]
            * len(self.kinds)
        )
        self._ref = output_list(reference, self.names if isinstance(reference, dict) else None)
        self.base_accuracy = float(metric(reference, targets))
        self._ref_energy = (
            sum(float((np.asarray(r, np.float64) ** 2).sum()) for r in self._ref) or 1.0
        )

    def __len__(self) -> int:
        return len(self.inputs)

    def outputs(self, path: Path) -> list[np.ndarray]:
        """The model file's outputs on the probe's inputs, one array per output."""
        from edgesmith.export.evaluate import artifact_outputs
        from edgesmith.runtime import load

        if self.ev is not None:
            return self.ev.outputs(self.ev.load(path), self.inputs)
        model = load(path, threads=self.threads, device="cpu")
        return artifact_outputs(model, self.inputs, self.head)

    def __call__(self, path: Path) -> Measurement:
        from edgesmith.export.parity import compare
        from edgesmith.feeds import user_outputs

        outs = self.outputs(path)
        parity = compare(self._ref, outs, self.kinds, self.tolerances, self.names)
        noise = sum(
            float(((np.asarray(o, np.float64) - np.asarray(r, np.float64)) ** 2).sum())
            for o, r in zip(outs, self._ref, strict=False)
        )
        return Measurement(
            float(self.metric(user_outputs(outs, self.names), self.targets)),
            self.base_accuracy,
            parity.agreement,
            noise / self._ref_energy,
            len(self.inputs),
            parity.passed,
            parity.reason,
            _LABELS.get(self.kinds[0], "agreement"),
        )


_LABELS = {
    "logits": "top-1 agreement",
    "embedding": "mean cosine",
    "features": "mean cosine",
    "regression": "1 - relative L2",
}


@dataclass
class SearchResult:
    """What the search found.

    Attributes:
        float_layers: ids of the layers kept float in the chosen model (empty: all int8).
        accepted: whether the chosen model met the budget and the parity tolerance.
        measurement: the chosen model on the search samples.
        sensitivity: ``(layer, output noise with only that layer in int8)``, most sensitive first.
        costs: layer id -> metric drop measured with that layer quantized too (refine step).
        trials: every candidate tried, for the report.
        reason: why the budget could not be met (empty when accepted).
    """

    float_layers: list[str]
    accepted: bool
    measurement: Measurement
    sensitivity: list[tuple[Layer, float]] = field(default_factory=list)
    costs: dict[str, float] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""


class _Trials:
    """Quantizes candidates into a work folder and measures them, remembering the best one."""

    def __init__(self, quantizer: Quantizer, work_dir: Path, suffix: str) -> None:
        self.q, self.work_dir, self.suffix = quantizer, work_dir, suffix
        self.n = 0
        self.log: list[dict[str, Any]] = []

    def run(self, float_layers: Sequence[str], probe: Probe, note: str) -> Measurement:
        self.n += 1
        path = self.work_dir / f"candidate-{self.n}{self.suffix}"
        files = self.q.quantize(path, float_layers)
        try:
            m = probe(path)
        finally:
            for f in files:
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
        self.log.append(
            {
                "step": note,
                "float_layers": len(float_layers),
                "samples": m.samples,
                "accuracy": round(m.accuracy, 6),
                "drop": round(m.drop, 6),
                "agreement": round(m.agreement, 6),
                "noise": float(f"{m.noise:.4g}"),
            }
        )
        return m


def search(
    quantizer: Quantizer,
    probe: Probe,
    *,
    sensitivity_probe: Probe,
    verify: Probe | None,
    max_accuracy_drop: float | None,
    max_float_layers: int,
    initial_float: Sequence[str] = (),
    refine: bool = True,
    work_dir: Path,
    suffix: str,
) -> SearchResult:
    """Find the fewest float layers for which the budget and the int8 parity tolerance hold.

    Args:
        quantizer: a calibrated format quantizer.
        probe: measures candidates on the search samples.
        sensitivity_probe: measures candidates on the (smaller) sensitivity samples.
        verify: measures an accepted candidate on the whole evaluation set (None: the search
            samples are the whole set).
        max_accuracy_drop: the budget (None: only the parity tolerance must hold).
        max_float_layers: how many layers may stay float at most, besides ``initial_float``.
        initial_float: layer ids kept float from the start (the user's choice).
        refine: try to quantize kept layers again after the walk.
        work_dir: where candidates are written (and deleted).
        suffix: the model file suffix of the format.
    """
    trials = _Trials(quantizer, work_dir, suffix)
    fmt = quantizer.format

    def ok(m: Measurement) -> bool:
        within = max_accuracy_drop is None or m.drop <= max_accuracy_drop + 1e-12
        return within and m.parity_ok

    def accept(layers: list[str], m: Measurement, note: str) -> bool:
        if not ok(m):
            return False
        if verify is None:
            return True
        return ok(trials.run(layers, verify, f"{note} (whole evaluation set)"))

    start = list(initial_float)
    first = trials.run(
        start, probe, "all int8" if not start else "int8 with the given float layers"
    )
    best = (start, first)
    if accept(start, first, "all int8"):
        return SearchResult(start, True, first, trials=trials.log)

    echo(
        f"{fmt} int8: drop {first.drop * 100:.2f} points, {first.label} {first.agreement:.4f}: "
        "measuring per-layer sensitivity"
    )
    candidates = [layer for layer in quantizer.layers if layer.id not in start]
    everything = [layer.id for layer in quantizer.layers]
    sensitivity: list[tuple[Layer, float]] = []
    for layer in track(candidates, f"sensitivity {fmt}"):
        # the layer alone in int8: its own error, not masked by the other layers' errors
        alone = [x for x in everything if x != layer.id]
        m = trials.run(alone, sensitivity_probe, f"sensitivity {layer.name}")
        sensitivity.append((layer, m.noise))
    sensitivity.sort(key=lambda t: -t[1])
    order = [layer.id for layer, _ in sensitivity]

    chosen: list[str] | None = None
    limit = min(max_float_layers, len(order))
    for k in track(range(1, limit + 1), f"mixed precision {fmt}"):
        layers = start + order[:k]
        m = trials.run(layers, probe, f"keep {k} float")
        if (m.drop, -m.agreement) < (best[1].drop, -best[1].agreement):
            best = (layers, m)
        if accept(layers, m, f"keep {k} float"):
            chosen, best = layers, (layers, m)
            break

    costs: dict[str, float] = {}
    if chosen is not None and refine:
        # passes until none of the kept layers can be quantized again: the result is 1-minimal,
        # and the last pass measures what each kept layer is worth
        current, changed = best[1], True
        while changed:
            changed, costs = False, {}
            for lid in reversed(chosen[len(start) :]):
                layers = [x for x in chosen if x != lid]
                m = trials.run(layers, probe, "refine")
                if accept(layers, m, "refine"):
                    chosen, current, changed = layers, m, True
                    break
                costs[lid] = m.drop - current.drop
        best = (chosen, current)

    layers, m = best
    if chosen is not None:
        return SearchResult(layers, True, m, sensitivity, costs, trials.log)
    if verify is not None:
        # the search samples are a subset, for speed; the budget is defined on the whole evaluation
        # set, where the best candidate may hold although none held on the subset
        m = trials.run(layers, verify, "best candidate (whole evaluation set)")
        if ok(m):
            return SearchResult(layers, True, m, sensitivity, costs, trials.log)
    budget = f"max_accuracy_drop {max_accuracy_drop}" if max_accuracy_drop is not None else "none"
    parity = f"int8 parity: {m.parity_reason}" if m.parity_reason else "int8 parity holds"
    reason = (
        f"best found keeps {len(layers)} layer(s) float (max_float_layers={max_float_layers}): "
        f"drop {m.drop * 100:.2f} points (budget: {budget}), {m.label} {m.agreement:.4f}; "
        f"{parity} (on {m.samples} samples)"
    )
    return SearchResult(layers, False, m, sensitivity, costs, trials.log, reason)
