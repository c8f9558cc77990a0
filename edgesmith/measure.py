"""Measurements of PyTorch models: accuracy, MACs, parameter bytes, eager latency."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgesmith.runtime.bench import time_fn

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

__all__ = ["batches", "count_macs", "model_size_bytes", "torch_latency", "torch_outputs"]


def batches(dataset: Dataset, batch_size: int) -> Any:
    """Yield (inputs, targets) numpy batches from a dataset of (tensor, target) pairs."""
    import torch
    from torch.utils.data import DataLoader

    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        yield (
            (x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)),
            (y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)),
        )


def torch_outputs(
    model: torch.nn.Module, dataset: Dataset, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Outputs (first output if several) and targets of ``model`` over ``dataset``."""
    import torch

    model.eval()
    outs, targets = [], []
    with torch.inference_mode():
        for x, y in batches(dataset, batch_size):
            out = model(torch.from_numpy(x))
            out = out[0] if isinstance(out, tuple | list) else out
            outs.append(out.float().numpy())
            targets.append(y)
    return np.concatenate(outs), np.concatenate(targets)


def count_macs(model: torch.nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass, counted at the dispatcher (FlopCounterMode).

    Counting at the dispatcher sees every ``F.conv2d`` call, which module-hook counters miss
    (DESIGN.md section 7: they report 21 M MACs for EfficientNet-Lite0 instead of 385 M).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(example)
    return int(counter.get_total_flops() // 2)


def model_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def torch_latency(
    model: torch.nn.Module, example: torch.Tensor, runs: int = 100
) -> dict[str, float]:
    """Eager batch latency of ``model`` on ``example`` (milliseconds percentiles)."""
    import torch

    model.eval()
    with torch.inference_mode():
        return time_fn(lambda: model(example), warmup=10, runs=runs, max_seconds=20.0)
