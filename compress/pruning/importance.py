"""Channel importance criteria: torch-pruning's estimators plus recurrent hidden units.

``l1``/``l2`` rank channels by the norm of every weight in their dependency group, ``bn_scale``
by the BatchNorm scale factors (network slimming), ``taylor`` by |weight x gradient| (first-order
Taylor expansion of the loss, gradients from a few training batches).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from edgesmith.compress.pruning.recurrent import RECURRENT_TYPES, recurrent_unit_importance

__all__ = ["CRITERIA", "GroupImportance", "accumulate_gradients_"]

CRITERIA = ("l1", "l2", "bn_scale", "taylor")


class GroupImportance(tp.importance.Importance):
    """One of :data:`CRITERIA` for a torch-pruning group, recurrent layers included.

    torch-pruning's estimators score convolutions, linear and normalisation layers; when a group
    is rooted at an LSTM/GRU, the scores of its hidden units (every gate's rows and the recurrent
    columns) are added, normalised like the rest.
    """

    def __init__(self, criterion: str) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"unknown importance '{criterion}'; known: {', '.join(CRITERIA)}")
        self.criterion = criterion
        self.p = 1 if criterion == "l1" else 2
        self.base: Any
        if criterion == "bn_scale":
            self.base = tp.importance.BNScaleImportance()
        elif criterion == "taylor":
            self.base = tp.importance.TaylorImportance()
        else:
            self.base = tp.importance.MagnitudeImportance(p=self.p)

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        imp = self.base(group)
        if self.criterion == "bn_scale":
            return imp
        root = group[0].dep.target.module
        if isinstance(root, RECURRENT_TYPES):
            idxs = group[0].idxs
            unit = recurrent_unit_importance(root, p=self.p, taylor=self.criterion == "taylor")
            unit = unit[torch.as_tensor(idxs, dtype=torch.long)]
            unit = unit / unit.mean().clamp_min(1e-12)
            imp = unit if imp is None else (imp.to(unit.dtype) + unit) / 2
        return imp


def accumulate_gradients_(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    loss_fn: Any = None,
) -> None:
    """Fill ``.grad`` of every parameter with the task loss's gradient over ``batches``
    (cross-entropy, or ``loss_fn(outputs, inputs, targets) -> (loss, _)``; inputs may be a tuple).

    Runs in eval mode (BatchNorm statistics and dropout untouched); for Taylor importance.
    """
    model.eval()
    model.zero_grad(set_to_none=True)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        for x, y in batches:
            out = model(*x) if isinstance(x, tuple | list) else model(x)
            if loss_fn is not None:
                loss_fn(out, x, y)[0].backward()
                continue
            out = out[0] if isinstance(out, tuple | list) else out
            F.cross_entropy(out, y).backward()
    for p, flag in zip(model.parameters(), flags, strict=True):
        p.requires_grad_(flag)
