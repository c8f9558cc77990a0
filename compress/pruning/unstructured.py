"""Unstructured magnitude pruning: individual weights set to zero, shapes unchanged.

Reported honestly: dense CPU kernels multiply zeros like any other number, so neither latency nor
the size of a dense model file changes. Zeros only pay off when the weights are stored
compressed; :func:`compressed_size` measures that (deflate, as in a ``.zip`` bundle).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

__all__ = ["compressed_size", "prune_unstructured_", "weight_sparsity"]

_TARGETS = (nn.modules.conv._ConvNd, nn.Linear)


def _targets(model: nn.Module, ignored: Sequence[str]) -> list[tuple[str, nn.Module]]:
    skip = set(ignored)
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _TARGETS)
        and name not in skip
        and not any(name.startswith(f"{s}.") for s in skip)
    ]


def prune_unstructured_(
    model: nn.Module, sparsity: float, scope: str = "global", ignore: Sequence[str] = ()
) -> float:
    """Zero the smallest-magnitude weights of every convolution and linear layer, in place.

    Args:
        model: edited in place (the zeros are baked in; no pruning masks stay behind).
        sparsity: fraction of the eligible weights to zero, in (0, 1).
        scope: ``global`` (one magnitude threshold over all layers, torch's ``global_unstructured``)
            or ``layer`` (the same fraction in every layer).
        ignore: layer names to leave dense.

    Returns:
        The fraction of eligible weights that are zero afterwards.
    """
    targets = _targets(model, ignore)
    params = [(m, "weight") for _, m in targets]
    if scope == "global":
        torch_prune.global_unstructured(
            params, pruning_method=torch_prune.L1Unstructured, amount=sparsity
        )
    else:
        for m, name in params:
            torch_prune.l1_unstructured(m, name, amount=sparsity)
    for m, name in params:
        torch_prune.remove(m, name)
    return weight_sparsity(model, ignore)


def weight_sparsity(model: nn.Module, ignore: Sequence[str] = ()) -> float:
    """Fraction of zero weights over the convolution and linear layers."""
    total = zeros = 0
    for _, m in _targets(model, ignore):
        w = m.weight.detach()
        total += w.numel()
        zeros += int((w == 0).sum())
    return zeros / total if total else 0.0


def compressed_size(source: nn.Module | Path, level: int = 9) -> int:
    """Bytes of a model's fp32 weights (or of a model file) after deflate compression."""
    if isinstance(source, Path):
        data = source.read_bytes()
    else:
        with torch.no_grad():
            data = b"".join(
                t.detach().cpu().contiguous().numpy().tobytes()
                for t in source.state_dict().values()
            )
    return len(zlib.compress(data, level))
