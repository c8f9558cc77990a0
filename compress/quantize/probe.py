"""Candidate models measured for the int8 float-layer search (``mixed.py``): a :class:`Probe`
runs a model file on fixed samples and compares it with the float model's outputs, giving a
:class:`Measurement`; ``_Trials`` quantizes candidates into a work folder and measures them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.compress.quantize.base import Quantizer

__all__ = ["Measurement", "Probe"]


@dataclass
class Measurement:
    """A candidate model measured on a sample of the evaluation set.

    ``complete`` is False when the measurement stopped early because the candidate could no longer
    reach the score it had to beat; its numbers then cover the samples seen so far.
    """

    accuracy: float
    base_accuracy: float
    agreement: float
    noise: float  # ||q - f||^2 / ||f||^2 over the outputs
    samples: int
    parity_ok: bool
    parity_reason: str = ""
    complete: bool = True
    label: str = "top-1 agreement"  # what ``agreement`` is, for messages

    @property
    def drop(self) -> float:
        return self.base_accuracy - self.accuracy


class Probe:
    """Runs model files on fixed inputs and compares them with the float model's outputs.

    Args:
        inputs / reference / targets: the samples, the float model's outputs on them, the labels.
        metric: the recipe's metric, ``metric(outputs, targets) -> float``.
        tolerance: the int8 parity tolerance: a ``ParityTolerance`` (one logits output), or one
            mapping per output (``Evaluator.tolerances``), each judged by its kind.
        threads: runtime threads.
        head: applied to the model file's outputs (a trainable-head build quantizes the backbone;
            its outputs are compared as ``head(backbone(x))``).
        per_sample: ``per_sample(outputs, targets) -> bool array`` when the metric is the mean of
            a per-sample hit (top-1, top-5): then a measurement can stop early, once the candidate
            cannot reach the score it has to beat.
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
        per_sample: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        evaluator: Any = None,
    ) -> None:
        from edgesmith.feeds import Samples, output_list

        self.inputs, self.reference, self.targets = Samples.of(inputs), reference, targets
        self.metric, self.tolerance, self.threads = metric, tolerance, threads
        self.head, self.per_sample, self.ev = head, per_sample, evaluator
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
        first = self._ref[0].reshape(len(self._ref[0]), -1) if self._ref else None
        self._ref_top1 = (
            first.argmax(1)
            if first is not None and self.kinds[0] == "logits" and first.shape[1] > 1
            else None
        )

    def __len__(self) -> int:
        return len(self.inputs)

    def _load(self, path: Path) -> Any:
        if self.ev is not None:
            return self.ev.load(path)
        from edgesmith.runtime import load

        return load(path, threads=self.threads, device="cpu")

    def _chunks(self, model: Any) -> list[tuple[int, int]]:
        fixed = model.inputs[0].shape[0]
        step = fixed if isinstance(fixed, int) else 64  # a model exported with a fixed batch
        n = len(self.inputs)
        chunk = max(step, (n // 8 // step) * step)
        return [(i, min(i + chunk, n)) for i in range(0, n, chunk)]

    def _run(self, model: Any, lo: int, hi: int) -> list[np.ndarray]:
        """The outputs of samples ``lo:hi``, one array per output."""
        from edgesmith.export.evaluate import artifact_outputs

        part = self.inputs[lo:hi]
        if self.ev is not None:
            return self.ev.outputs(model, part)
        return artifact_outputs(model, part, self.head)

    def outputs(self, path: Path) -> list[np.ndarray]:
        """The model file's outputs on the probe's inputs, one array per output."""
        return self._run(self._load(path), 0, len(self.inputs))

    def __call__(
        self, path: Path, floor: float | None = None, by_agreement: bool = False
    ) -> Measurement:
        """Measure ``path``; with ``floor``, stop as soon as its score (the metric, or the top-1
        agreement with ``by_agreement``) can no longer reach ``floor``."""
        from edgesmith.feeds import take_targets

        model = self._load(path)
        n = len(self.inputs)
        can_stop = floor is not None and (
            (by_agreement and self._ref_top1 is not None)
            or (not by_agreement and self.per_sample is not None)
        )
        parts: list[list[np.ndarray]] = []
        hits = 0
        for lo, hi in self._chunks(model) if can_stop else [(0, n)]:
            outs = self._run(model, lo, hi)
            parts.append(outs)
            if not can_stop or hi == n:
                continue
            out = outs[0]
            if by_agreement:
                assert self._ref_top1 is not None
                hits += int((out.reshape(len(out), -1).argmax(1) == self._ref_top1[lo:hi]).sum())
            else:
                assert self.per_sample is not None
                part = take_targets(self.targets, slice(lo, hi))
                hits += int(np.asarray(self.per_sample(out, part)).sum())
            assert floor is not None
            if (hits + n - hi) / n < floor - 1e-12:  # even all the rest right cannot reach it
                return self._measure(_join(parts), complete=False)
        return self._measure(_join(parts), complete=True)

    def _measure(self, outs: list[np.ndarray], complete: bool) -> Measurement:
        from edgesmith.export.parity import compare
        from edgesmith.feeds import take_targets, user_outputs

        k = len(outs[0]) if outs else 0
        ref = [r[:k] for r in self._ref]
        targets = take_targets(self.targets, slice(0, k))
        parity = compare(ref, outs, self.kinds, self.tolerances, self.names)
        noise = sum(
            float(((np.asarray(o, np.float64) - np.asarray(r, np.float64)) ** 2).sum())
            for o, r in zip(outs, ref, strict=False)
        )
        energy = sum(float((np.asarray(r, np.float64) ** 2).sum()) for r in ref) or 1.0
        return Measurement(
            float(self.metric(user_outputs(outs, self.names), targets)),
            float(self.metric(user_outputs(ref, self.names), targets))
            if k < len(self)
            else self.base_accuracy,
            parity.agreement,
            noise / energy,
            k,
            parity.passed,
            parity.reason,
            complete,
            _LABELS.get(self.kinds[0], "agreement"),
        )


_LABELS = {
    "logits": "top-1 agreement",
    "embedding": "mean cosine",
    "features": "mean cosine",
    "regression": "1 - relative L2",
}


def _join(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Per-chunk output lists joined along the samples, one array per output."""
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))] if parts else []


class _Trials:
    """Quantizes candidates into a work folder and measures them."""

    def __init__(self, quantizer: Quantizer, work_dir: Path, suffix: str) -> None:
        self.q, self.work_dir, self.suffix = quantizer, work_dir, suffix
        self.n = 0
        self.log: list[dict[str, Any]] = []

    def write(self, float_layers: Sequence[str]) -> tuple[Path, list[Path]]:
        self.n += 1
        path = self.work_dir / f"candidate-{self.n}{self.suffix}"
        return path, self.q.quantize(path, float_layers)

    def run(
        self,
        float_layers: Sequence[str],
        probe: Probe,
        note: str,
        floor: float | None = None,
        by_agreement: bool = False,
        keep: bool = False,
    ) -> tuple[Measurement, list[Path]]:
        """Quantize and measure; the files are deleted unless ``keep`` (then returned)."""
        path, files = self.write(float_layers)
        try:
            m = probe(path, floor, by_agreement)
        finally:
            if not keep:
                _remove(files)
        self.log.append(
            {
                "step": note,
                "float_layers": len(float_layers),
                "samples": m.samples,
                "complete": m.complete,
                "accuracy": round(m.accuracy, 6),
                "drop": round(m.drop, 6),
                "top1_agreement": round(m.agreement, 6),
                "noise": float(f"{m.noise:.4g}"),
            }
        )
        return m, files if keep else []


def _remove(files: Sequence[Path]) -> None:
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
