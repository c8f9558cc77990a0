"""Accuracy-aware mixed precision, for any format: float layers only as a last resort, chosen by
accuracy gained per latency lost, greedily on the measured effect on the whole model.

1. Quantize everything (weights already bias-corrected, ``ptq.py``); if the budget and the int8
   parity tolerance hold, stop: no layer is kept float.
2. Rank the candidates by estimated accuracy gained per latency lost: the gain from ``ranking``
   (the PyTorch simulation of the int8 model with that one layer float, cheap), or, without one,
   from the real model with that one layer float on the sensitivity samples; the latency from the
   layer's share of the model's multiply-accumulates.
3. Greedy on the measured joint effect: at each step the best-ranked candidates are each added to
   the layers already float, the whole model is quantized and measured on the search samples
   (stopping early once a candidate cannot beat the current model) and timed on the target
   backend; a step is kept only if it improves the model, choosing the candidate that meets the
   budget at the least latency, else the most accuracy gained per latency lost. When no single
   layer improves it (errors that compound, or flips that move around), blocks of the best-ranked
   layers go float together: 2, 4, 8... up to every layer still allowed. A step that does not
   help is never kept, so the search moves monotonically towards the float model, and a budget
   the float model meets is reached when ``max_float_layers`` allows every layer.
4. Refine: try quantizing each kept layer again; what still holds stays int8 (1-minimal).
5. If nothing held on the search samples, the best model is measured on the whole evaluation
   set, where the budget is defined; the reason names the layers tried and what was measured.

A format only has to provide ``Quantizer.layers`` and ``Quantizer.quantize(path, float_layers)``.
Candidates are measured by ``probe.py`` (``Probe``, ``Measurement``; still importable from here).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesmith.compress.quantize.base import Layer, Quantizer
from edgesmith.compress.quantize.probe import Measurement, Probe, _remove, _Trials
from edgesmith.progress import echo, track

__all__ = ["Fallback", "Measurement", "Probe", "SearchResult", "search"]

log = logging.getLogger(__name__)

# a candidate's latency cost is at least this fraction of the model's (timing noise)
MIN_COST = 0.01


@dataclass
class Fallback:
    """One layer the search kept in float, and what it cost.

    Attributes:
        id: the layer's id in the format.
        accuracy_gain / agreement_gain: how much the metric and the top-1 agreement rose when it
            went float (search samples, joint with the layers already float).
        latency_ms: how much slower the model got (interleaved timing on the target backend).
        estimate: its rank score (estimated gain per latency share).
        block: how many layers went float together in its step (their gain and cost are the
            block's: no single one of them improved the model alone).
    """

    id: str
    accuracy_gain: float
    latency_ms: float | None
    estimate: float
    block: int = 1
    agreement_gain: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy_gain": round(self.accuracy_gain, 6),
            "agreement_gain": round(self.agreement_gain, 6),
            "latency_cost_ms": None if self.latency_ms is None else round(self.latency_ms, 4),
            "rank_score": float(f"{self.estimate:.4g}"),
            **({"block": self.block} if self.block > 1 else {}),
        }


@dataclass
class SearchResult:
    """What the search found.

    Attributes:
        float_layers: ids of the layers kept float in the chosen model (empty: all int8).
        accepted: whether the chosen model met the budget and the parity tolerance.
        measurement: the chosen model on the search samples.
        first: the all-int8 model on the search samples.
        sensitivity: ``(layer, estimated accuracy gain if float)``, most promising first.
        fallbacks: the kept-float layers in the order they were chosen, with their cost.
        trials: every candidate tried, for the report.
        reason: why the budget could not be met (empty when accepted).
        latency_ms: the all-int8 and the chosen model's latency on the target backend (when timed).
    """

    float_layers: list[str]
    accepted: bool
    measurement: Measurement
    first: Measurement | None = None
    sensitivity: list[tuple[Layer, float]] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    latency_ms: dict[str, float] = field(default_factory=dict)


def search(
    quantizer: Quantizer,
    probe: Probe,
    *,
    verify: Probe | None,
    max_accuracy_drop: float | None,
    max_float_layers: int,
    initial_float: Sequence[str] = (),
    refine: bool = True,
    work_dir: Path,
    suffix: str,
    sensitivity_probe: Probe | None = None,
    ranking: Callable[[list[Layer]], dict[str, float]] | None = None,
    cost_share: dict[str, float] | None = None,
    timer: Callable[[list[Path]], list[float]] | None = None,
    candidates: int = 3,
) -> SearchResult:
    """Find few float layers, cheap in latency, for which the budget and the parity tolerance hold.

    Args:
        quantizer: a calibrated format quantizer.
        probe: measures candidates on the search samples.
        verify: measures an accepted candidate on the whole evaluation set (None: the search
            samples are the whole set).
        max_accuracy_drop: the budget (None: only the parity tolerance must hold).
        max_float_layers: how many layers may stay float at most, besides ``initial_float``.
        initial_float: layer ids kept float from the start (the user's choice).
        refine: try to quantize kept layers again after the walk.
        work_dir: where candidates are written (and deleted).
        suffix: the model file suffix of the format.
        sensitivity_probe: measures single-layer candidates when there is no ``ranking``.
        ranking: ``ranking(layers) -> {id: estimated gain}`` (e.g. the PyTorch simulation).
        cost_share: ``{id: share of the model's MACs}``, the latency estimate of the ranking.
        timer: ``timer(paths) -> ms`` on the target backend, timed interleaved.
        candidates: candidates measured per greedy step.
    """
    trials = _Trials(quantizer, work_dir, suffix)
    fmt = quantizer.format
    by_agreement = max_accuracy_drop is None  # without a budget, parity is the gate

    def ok(m: Measurement) -> bool:
        within = max_accuracy_drop is None or m.drop <= max_accuracy_drop + 1e-12
        return m.complete and within and m.parity_ok

    def score(m: Measurement) -> tuple[float, float, float]:
        main, other = (m.agreement, m.accuracy) if by_agreement else (m.accuracy, m.agreement)
        return (main, other, -m.noise)

    def accept(layers: list[str], m: Measurement, note: str) -> bool:
        if not ok(m):
            return False
        if verify is None:
            return True
        return ok(trials.run(layers, verify, f"{note} (whole evaluation set)")[0])

    start = list(initial_float)
    first, cur_files = trials.run(
        start,
        probe,
        "all int8" if not start else "int8 with the given float layers",
        keep=timer is not None,
    )
    result = SearchResult(start, False, first, first, trials=trials.log)
    try:
        if accept(start, first, "all int8"):
            result.accepted = True
            return result
        pool = [layer for layer in quantizer.layers if layer.id not in start]
        if max_float_layers <= 0 or not pool:
            return _give_up(
                result, start, first, verify, ok, trials, max_accuracy_drop, max_float_layers
            )
        echo(
            f"{fmt} int8: drop {first.drop * 100:.2f} points, {first.label} {first.agreement:.4f}: "
            f"ranking {len(pool)} layers by accuracy gained per latency lost"
        )
        gains = (
            ranking(pool)
            if ranking
            else _sensitivity(pool, start, trials, sensitivity_probe or probe, first)
        )
        shares = cost_share or {}
        priority = {
            layer.id: gains.get(layer.id, 0.0) / (shares.get(layer.id, 0.0) + MIN_COST)
            for layer in pool
        }
        result.sensitivity = sorted(
            ((layer, gains.get(layer.id, 0.0)) for layer in pool), key=lambda t: -t[1]
        )
        order = [layer.id for layer in sorted(pool, key=lambda layer: -priority[layer.id])]
        names = {layer.id: layer.name for layer in quantizer.layers}

        current, cur_m, chosen = list(start), first, None
        current_ms: float | None = None
        rejected: set[str] = set()
        status: dict[str, object] = {"best": _describe(first, 0)}
        step = 0
        while len(current) - len(start) < max_float_layers:
            step += 1
            tries = [lid for lid in order if lid not in current and lid not in rejected][
                :candidates
            ]
            if not tries:
                break
            measured: list[tuple[str, Measurement, float | None, list[Path]]] = []
            floor = score(cur_m)[0]
            for lid in track(tries, f"{fmt} int8 search, float layer {step}", status=status):
                m, files = trials.run(
                    [*current, lid],
                    probe,
                    f"step {step}: + {names[lid]}",
                    floor,
                    by_agreement,
                    keep=True,
                )
                if not (m.complete and score(m) > score(cur_m)):
                    rejected.add(lid)  # it does not help on top of the layers already float
                    _remove(files)
                    continue
                cost = None
                if timer and cur_files:
                    cur_t, cand_t = timer([cur_files[0], files[0]])
                    current_ms = cur_t if current_ms is None else current_ms
                    cost = cand_t - cur_t
                measured.append((lid, m, cost, files))
                status["best"] = _describe(
                    max([cur_m, *(t[1] for t in measured)], key=score),
                    len(current) + 1 - len(start),
                )
            if measured:
                lid, m, cost, files = _choose(measured, cur_m, current_ms, ok, score)
                for other in measured:
                    if other[0] != lid:
                        _remove(other[3])
                added = [lid]
            else:
                # no single layer helps (errors that compound, or flips that move around): add
                # blocks of the best-ranked layers, 2, 4, 8... up to the limit, whose last is
                # every allowed layer at once
                block = _block(
                    order,
                    current,
                    start,
                    max_float_layers,
                    probe,
                    trials,
                    names,
                    step,
                    score,
                    cur_m,
                )
                if block is None:
                    break
                added, m, files = block
                cost = None
                if timer and cur_files:
                    cur_t, cand_t = timer([cur_files[0], files[0]])
                    current_ms = cur_t if current_ms is None else current_ms
                    cost = cand_t - cur_t
            for lid in added:
                result.fallbacks.append(
                    Fallback(
                        lid,
                        m.accuracy - cur_m.accuracy,
                        cost,
                        priority[lid],
                        len(added),
                        m.agreement - cur_m.agreement,
                    )
                )
            _remove(cur_files)
            current, cur_m, cur_files = [*current, *added], m, files
            if current_ms is not None and cost is not None:
                current_ms += cost
            if accept(current, m, f"step {step}"):
                chosen = current
                break
    finally:
        _remove(cur_files)

    if chosen is not None and refine:
        # passes until none of the kept layers can be quantized again: the result is 1-minimal
        changed = True
        while changed:
            changed = False
            for fb in reversed([f for f in result.fallbacks if f.id in chosen]):
                layers = [x for x in chosen if x != fb.id]
                floor = (
                    None if max_accuracy_drop is None else cur_m.base_accuracy - max_accuracy_drop
                )
                m, _ = trials.run(layers, probe, f"refine: - {names[fb.id]}", floor)
                if accept(layers, m, "refine"):
                    chosen, cur_m, changed = layers, m, True
                    result.fallbacks = [f for f in result.fallbacks if f.id != fb.id]
                    if current_ms is not None:  # the chosen model no longer pays for it
                        current_ms -= fb.latency_ms or 0.0
                    break

    if current_ms is not None:
        result.latency_ms = {
            "all_int8": round(current_ms - sum(f.latency_ms or 0.0 for f in result.fallbacks), 4),
            "chosen": round(current_ms, 4),
        }
    if chosen is not None:
        result.float_layers, result.accepted, result.measurement = chosen, True, cur_m
        return result
    result.float_layers, result.measurement = current, cur_m
    return _give_up(result, current, cur_m, verify, ok, trials, max_accuracy_drop, max_float_layers)


def _block(
    order: list[str],
    current: list[str],
    start: list[str],
    max_float_layers: int,
    probe: Probe,
    trials: _Trials,
    names: dict[str, str],
    step: int,
    score: Callable[[Measurement], tuple[float, float, float]] | None = None,
    cur: Measurement | None = None,
) -> tuple[list[str], Measurement, list[Path]] | None:
    """The first block of the best-ranked remaining layers (2, 4, 8... of them, the last one every
    layer still allowed) whose joint effect improves the model, or None."""
    rest = [lid for lid in order if lid not in current]
    room = min(max_float_layers - (len(current) - len(start)), len(rest))
    sizes, k = [], 2
    while k < room:
        sizes.append(k)
        k *= 2
    if room >= 2:
        sizes.append(room)
    for k in sizes:
        layers = rest[:k]
        m, files = trials.run(
            [*current, *layers],
            probe,
            f"step {step}: + block of {k} ({names[layers[0]]}...)",
            keep=True,
        )
        assert score is not None and cur is not None
        if m.complete and score(m) > score(cur):
            return layers, m, files
        _remove(files)
    return None


def _describe(m: Measurement, n: int) -> str:
    return f"{n} float, drop {m.drop * 100:.2f} pts, agreement {m.agreement:.4f}"


def _choose(
    measured: list[tuple[str, Measurement, float | None, list[Path]]],
    cur: Measurement,
    cur_ms: float | None,
    ok: Callable[[Measurement], bool],
    score: Callable[[Measurement], tuple[float, float, float]],
) -> tuple[str, Measurement, float | None, list[Path]]:
    """The step to take: the candidate meeting the budget at the least latency, else the most
    accuracy gained per latency lost (latency unknown: the most accuracy)."""
    meeting = [t for t in measured if ok(t[1])]
    if meeting:
        return min(meeting, key=lambda t: (t[2] or 0.0, [-v for v in score(t[1])]))
    if cur_ms is None or any(t[2] is None for t in measured):
        return max(measured, key=lambda t: score(t[1]))
    floor = MIN_COST * cur_ms

    def per_ms(t: tuple[str, Measurement, float | None, list[Path]]) -> float:
        return (score(t[1])[0] - score(cur)[0]) / max(t[2] or 0.0, floor)

    return max(measured, key=per_ms)


def _sensitivity(
    pool: list[Layer], start: list[str], trials: _Trials, probe: Probe, first: Measurement
) -> dict[str, float]:
    """Without a simulation: each layer alone in float on the real model, as output noise removed."""
    gains: dict[str, float] = {}
    for layer in track(pool, f"sensitivity {trials.q.format}"):
        m, _ = trials.run([*start, layer.id], probe, f"sensitivity {layer.name}")
        gains[layer.id] = first.noise - m.noise
    return gains


def _give_up(
    result: SearchResult,
    layers: list[str],
    m: Measurement,
    verify: Probe | None,
    ok: Callable[[Measurement], bool],
    trials: _Trials,
    max_accuracy_drop: float | None,
    max_float_layers: int,
) -> SearchResult:
    """No candidate held on the search samples: judge the best one where the budget is defined."""
    if verify is not None:
        # the search samples are a subset, for speed; the budget is defined on the whole evaluation
        # set, where the best candidate may hold although none held on the subset
        m, _ = trials.run(layers, verify, "best candidate (whole evaluation set)")
        result.measurement = m
        if ok(m):
            result.accepted = True
            return result
    names = {layer.id: layer.name for layer in trials.q.layers}
    budget = f"max_accuracy_drop {max_accuracy_drop}" if max_accuracy_drop is not None else "none"
    parity = f"int8 parity: {m.parity_reason}" if m.parity_reason else "int8 parity holds"
    kept = ", ".join(names.get(x, x) for x in layers) or "none"
    tried = [t for t in result.trials if t["step"].startswith("step ")]
    tail = (
        f"; {len(tried)} candidate(s) measured, none of the others improved the model"
        if tried
        else ""
    )
    result.reason = (
        f"best found keeps {len(layers)} layer(s) float ({kept}; max_float_layers="
        f"{max_float_layers}): drop {m.drop * 100:.2f} points (budget: {budget}), {m.label} "
        f"{m.agreement:.4f}; {parity} (on {m.samples} samples){tail}"
    )
    return result
