"""Per-weight importance scores shared by the attention-head and recurrent-unit criteria."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

__all__ = ["weight_scores"]


def weight_scores(
    params: Iterable[tuple[str, torch.Tensor]], p: int, taylor: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, score)`` per parameter: ``|w|^p``, or ``|w * grad|`` (first-order Taylor).

    With ``taylor``, a parameter without a gradient is skipped. Call under ``torch.no_grad()``.
    """
    for name, w in params:
        if taylor:
            if w.grad is None:
                continue
            yield name, (w.data * w.grad).abs()
        else:
            yield name, w.data.abs().pow(p)
