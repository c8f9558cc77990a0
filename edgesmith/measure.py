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
    Recurrent layers and fused attention run as kernels the counter has no formula for; the
    formulas below count them.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with (
        torch.inference_mode(),
        FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter,
    ):
        model(example)
    return int(counter.get_total_flops() // 2)


# --------------------------------------------------------------------------- extra FLOP formulas
# FlopCounterMode has no formula for the fused ops that recurrent layers, nn.MultiheadAttention's
# inference fast path and CPU scaled-dot-product attention dispatch to, so it counted them as 0
# (an LSTM classifier showed only its last Linear). Formulas below count 2 FLOPs per MAC.


def _rnn_flops(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """aten.lstm/gru/rnn_*: every 2-D weight is applied once per time step and sample.

    Overload ``input``: (input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
    batch_first); overload ``data`` (PackedSequence): (data, batch_sizes, hx, params, ...), where
    ``data`` holds each (time step, sample) row once.
    """
    if isinstance(args[3], list | tuple):
        rows, params = args[0][0], args[3]
    else:
        shape, params = args[0], args[2]
        rows = shape[0] if len(shape) == 2 else shape[0] * shape[1]  # (T, I) or (T, N, I)/(N, T, I)
    return 2 * rows * sum(int(np.prod(p)) for p in params if len(p) == 2)


def _sdpa_shapes(q: Any, k: Any, v: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    def four(s: Any) -> tuple[int, ...]:
        s = tuple(s)
        lead = int(np.prod(s[:-2])) if len(s) > 2 else 1
        return (lead, 1, s[-2], s[-1])

    return int(sdpa_flop_count(four(q), four(k), four(v)))


def _sdpa_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return _sdpa_shapes(q, k, v)


def _native_mha_flops(
    q: Any,
    k: Any,
    v: Any,
    embed_dim: int,
    num_heads: int,
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    """aten._native_multi_head_attention (batch first): projections, scores, weighted sum, output."""
    batch, lq, e = (1, *q) if len(q) == 2 else q
    lk = k[-2]
    proj = 2 * batch * (lq * e * embed_dim + 2 * lk * e * embed_dim + lq * embed_dim * embed_dim)
    return proj + _sdpa_shapes(
        (batch, lq, embed_dim), (batch, lk, embed_dim), (batch, lk, embed_dim)
    )


def _extra_flop_formulas() -> dict[Any, Any]:
    import torch

    aten = torch.ops.aten
    formulas = {
        aten.lstm: _rnn_flops,
        aten.gru: _rnn_flops,
        aten.rnn_tanh: _rnn_flops,
        aten.rnn_relu: _rnn_flops,
        aten._native_multi_head_attention: _native_mha_flops,
    }
    cpu_sdpa = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        formulas[cpu_sdpa] = _sdpa_flops
    # the counter looks an op up by overload (to decide whether to decompose it) and counts it by
    # packet: register both, so that an LSTM is counted as one op rather than decomposed into
    # kernels the counter does not know either
    out: dict[Any, Any] = dict(formulas)
    for packet, fn in formulas.items():
        for name in packet.overloads():
            out[getattr(packet, name)] = fn
    return out


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
