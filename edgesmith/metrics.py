"""Task metrics over numpy outputs: top-1, top-5, or a user's ``module:function``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgesmith.errors import RecipeError
from edgesmith.refs import resolve_ref

__all__ = ["Metric", "get_metric", "top1", "top5", "topk_accuracy"]

Metric = Callable[[np.ndarray, np.ndarray], float]


def topk_accuracy(outputs: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Fraction of samples whose target is among the ``k`` largest outputs."""
    outputs = np.asarray(outputs).reshape(len(targets), -1)
    top = np.argpartition(-outputs, kth=min(k, outputs.shape[1]) - 1, axis=1)[:, :k]
    return float((top == np.asarray(targets)[:, None]).any(axis=1).mean())


def top1(outputs: np.ndarray, targets: np.ndarray) -> float:
    return float(
        (np.asarray(outputs).reshape(len(targets), -1).argmax(axis=1) == np.asarray(targets)).mean()
    )


def top5(outputs: np.ndarray, targets: np.ndarray) -> float:
    return topk_accuracy(outputs, targets, 5)


METRICS: dict[str, Metric] = {"top1": top1, "top5": top5}


def get_metric(name: str) -> Metric:
    """A built-in metric by name, or ``module:function`` taking (outputs, targets) -> float."""
    if name in METRICS:
        return METRICS[name]
    fn = resolve_ref(name, what="metric", error=RecipeError)

    def _wrapped(outputs: np.ndarray, targets: np.ndarray) -> float:
        value = fn(outputs, targets)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RecipeError(
                f"metric '{name}' returned {type(value).__name__}, not a number",
                hint="return a float, higher is better",
            ) from None

    return _wrapped
