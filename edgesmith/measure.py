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


def _rnn_macs(model: torch.nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Analytic MACs of recurrent layers, which FlopCounterMode does not count (fused CPU kernels)."""
    import torch

    gates = {torch.nn.LSTM: 4, torch.nn.GRU: 3, torch.nn.RNN: 1}
    found: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if type(mod) not in gates:
            continue

        def hook(m: Any, args: Any, _out: Any, name: str = name) -> None:
            x = args[0]
            if isinstance(x, torch.nn.utils.rnn.PackedSequence):
                steps, batch = int(x.data.shape[0]), 1
            else:
                steps, batch = (
                    (x.shape[1], x.shape[0])
                    if m.batch_first
                    else (x.shape[0], x.shape[1] if x.dim() == 3 else 1)
                )
            dirs = 2 if m.bidirectional else 1
            hidden, total = m.hidden_size, 0
            for layer in range(m.num_layers):
                inp = m.input_size if layer == 0 else hidden * dirs
                total += gates[type(m)] * hidden * (inp + hidden) * steps * batch * dirs
            found[name] = found.get(name, 0) + int(total)

        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            if hooks:
                model(example)
    finally:
        for h in hooks:
            h.remove()
    return found


def count_macs(model: torch.nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass, counted at the dispatcher (FlopCounterMode).

    Counting at the dispatcher sees every ``F.conv2d`` call, which module-hook counters miss
    (DESIGN.md section 7: they report 21 M MACs for EfficientNet-Lite0 instead of 385 M).
    Recurrent layers run as fused kernels the counter has no formula for; their MACs are added
    analytically (gates x hidden x (input + hidden) per step).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no flop formula
    try:
        from torch.utils.flop_counter import sdpa_flop_count

        def cpu_sdpa_flop(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
            return int(sdpa_flop_count(query.shape, key.shape, value.shape))

        cpu_sdpa_flop._get_raw = True  # type: ignore[attr-defined]
        # the CPU flash-attention kernel has no formula of its own: count it like the others
        cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flop}
        with (
            torch.inference_mode(),
            FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter,
        ):
            model(example)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    total = int(counter.get_total_flops() // 2)
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    for name, macs in _rnn_macs(model, example).items():
        counted = sum(per_module.get(f"{root}.{name}" if name else root, {}).values()) // 2
        if counted < macs // 2:  # the counter missed (most of) it
            total += macs - counted
    return total


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
