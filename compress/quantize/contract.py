"""One accuracy contract for int8: the user's ``max_accuracy_drop`` is the gate.

Two checks can refuse an int8 model: the accuracy budget (``max_accuracy_drop``, on the recipe's
metric) and the int8 parity tolerance (top-1 agreement with the float model, ``parity.int8``).
When the user sets a budget and leaves the int8 tolerance at its default, the budget decides and
the tolerance only guards against broken models (agreement far below anything the budget allows);
when the user sets both, both apply; without a budget the default tolerance is the gate. Every
message says which tolerance applied and where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgesmith.schema import ParityTolerance

__all__ = ["DEFAULT_INT8", "Contract", "guard_agreement", "int8_contract"]

# the recipe's default int8 tolerance (schema._default_parity); a recipe whose int8 entry equals it
# is treated as not having set one (a dumped recipe writes every default out)
DEFAULT_INT8 = ParityTolerance(top1_agreement=0.97, max_abs_diff=None)


def guard_agreement(max_accuracy_drop: float) -> float:
    """The top-1 agreement below which an int8 model is broken whatever its accuracy: 0.8 less
    ten times the budget, at least 0.5 (0.75 for a half-point budget)."""
    return round(max(0.5, 0.8 - 10 * max_accuracy_drop), 4)


@dataclass(frozen=True)
class Contract:
    """The int8 checks in force.

    Attributes:
        tolerance: the int8 parity tolerance applied to the search and the final model.
        source: ``recipe`` (set by the user), ``budget`` (a guard that follows from
            ``max_accuracy_drop``) or ``default`` (no budget: the default tolerance is the gate).
        max_accuracy_drop: the user's budget, or None.
    """

    tolerance: ParityTolerance
    source: str
    max_accuracy_drop: float | None

    @property
    def gate(self) -> str:
        """The check that decides whether the int8 model is accurate enough."""
        return "max_accuracy_drop" if self.max_accuracy_drop is not None else "parity"

    def describe(self) -> str:
        """The tolerance in words, naming where it came from (for failure messages)."""
        t = self.tolerance
        limits = f"top-1 agreement >= {t.top1_agreement:g}" + (
            f", max abs diff <= {t.max_abs_diff:g}" if t.max_abs_diff is not None else ""
        )
        if self.source == "recipe":
            return f"the int8 parity tolerance set in the recipe (parity.int8: {limits})"
        if self.source == "budget":
            return (
                f"the int8 parity guard that follows from max_accuracy_drop {self.max_accuracy_drop:g} "
                f"({limits}, a guard against broken int8 models; the budget is the accuracy gate; "
                "set parity.int8 in the recipe to choose another)"
            )
        return (
            f"the default int8 parity tolerance ({limits}; no max_accuracy_drop is set, so it is "
            "the accuracy gate: set max_accuracy_drop to make your budget the gate)"
        )

    def to_json(self, decided_by: str) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "max_accuracy_drop": self.max_accuracy_drop,
            "parity": {
                "top1_agreement": self.tolerance.top1_agreement,
                "max_abs_diff": self.tolerance.max_abs_diff,
                "source": self.source,
            },
            "decided_by": decided_by,
        }


def int8_contract(parity: dict[str, ParityTolerance], max_accuracy_drop: float | None) -> Contract:
    """The int8 checks for a recipe's ``parity`` section and a stage's budget."""
    given = parity.get("int8")
    if given is not None and given != DEFAULT_INT8:
        return Contract(given, "recipe", max_accuracy_drop)
    if max_accuracy_drop is not None:
        guard = ParityTolerance(
            top1_agreement=guard_agreement(max_accuracy_drop), max_abs_diff=None
        )
        return Contract(guard, "budget", max_accuracy_drop)
    return Contract(given or DEFAULT_INT8, "default", None)
