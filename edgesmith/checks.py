"""Typed checks: a measurement held against a limit from the recipe.

Stages, artifact hooks and the export each return :class:`Check` objects; the build and the
commands decide from their fields (``passed``, ``key``, ``hint``), never from sentences, and the
report lists the ``detail`` of every failed one under ``failures``.

The accuracy budget (``max_accuracy_drop``) is one rule, :func:`accuracy_budget`: the drop of the
recipe's metric from a reference model to the stage's result, failed when it exceeds the limit.
``prune`` and ``distill`` count from the model as the recipe loaded it (the report's baseline,
also distill's default teacher); ``quantize`` and ``qat`` count from the float model they
quantize (as it entered the stage), because their drop is the cost of quantization alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "BUDGET_HINT",
    "PARITY_HINT",
    "Check",
    "accuracy_budget",
    "failed",
    "failure_hint",
]

BUDGET_HINT = "raise max_accuracy_drop (or max_float_layers), train longer, or try the qat stage"
PARITY_HINT = "relax the tolerance in the recipe ('parity:') only if you can defend it"

# float noise: an accuracy of 0.925 against 0.93 is a drop of 0.005, not of 0.00500000000004
_EPS = 1e-12


@dataclass(frozen=True)
class Check:
    """One measurement held against a limit.

    Attributes:
        stage: who checked: a stage name (``prune``, ``quantize``) or ``export`` for parity.
        key: the recipe key whose limit is checked (``max_accuracy_drop``, ``parity``).
        limit: the limit, in the key's unit (None where the key holds several, e.g. parity).
        measured: the measured value in the same unit (None where ``limit`` is).
        passed: whether the measurement is within the limit.
        hint: how to fix it when it failed.
        detail: one sentence saying what was measured, for the report's ``failures``.
    """

    stage: str
    key: str
    limit: float | None
    measured: float | None
    passed: bool
    hint: str
    detail: str = ""

    def __str__(self) -> str:
        return self.detail or f"{self.stage}: {self.key} {self.measured} (limit {self.limit})"


def accuracy_budget(
    stage: str, reference: float, accuracy: float, limit: float, detail: str | None = None
) -> Check:
    """The ``max_accuracy_drop`` check: ``reference - accuracy <= limit``.

    Args:
        stage: the stage that checks.
        reference: the metric of the reference model (see the module docstring for which).
        accuracy: the metric of the stage's result.
        limit: the largest tolerated absolute drop (0.005 = half a point of top-1).
        detail: the failure sentence, when the stage has more to say than the numbers.
    """
    drop = reference - accuracy
    return Check(
        stage,
        "max_accuracy_drop",
        limit,
        round(drop, 6),
        drop <= limit + _EPS,
        BUDGET_HINT,
        detail
        or f"{stage}: accuracy fell {drop:.4f} ({reference:.4f} -> {accuracy:.4f}), "
        f"more than max_accuracy_drop {limit}",
    )


def failed(checks: Iterable[Check]) -> list[Check]:
    """The checks that did not pass, in order."""
    return [c for c in checks if not c.passed]


def failure_hint(checks: Iterable[Check]) -> str:
    """The hint for a set of failed checks: a budget's (it names what to change) before others'."""
    bad = failed(checks)
    budget = [c for c in bad if c.key == "max_accuracy_drop"]
    return (budget or bad)[0].hint if bad else ""
