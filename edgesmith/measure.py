"""Measurements of PyTorch models: accuracy, MACs, parameter bytes, eager latency."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgesmith.feeds import Samples, concat_outputs, infer_layouts, read_split
from edgesmith.runtime.bench import time_fn

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

__all__ = [
    "batches",
    "count_macs",
    "model_size_bytes",
    "torch_latency",
    "torch_outputs",
    "torch_run",
]


def _args(example: Any) -> tuple[Any, ...]:
    """A model's positional inputs: one tensor, or a tuple/list of them."""
    return tuple(example) if isinstance(example, tuple | list) else (example,)


def batches(dataset: Dataset, batch_size: int, collate: Any = None) -> Any:
    """Yield (inputs, targets) numpy batches from a dataset of (inputs, target) pairs; inputs are
    one array, or a tuple of arrays (one per model input; ``collate`` pads varying sizes)."""
    import torch
    from torch.utils.data import DataLoader

    def np_(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return tuple(np_(a) for a in v)
        return v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)

    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        yield np_(x), np_(y)


def torch_run(model: torch.nn.Module, samples: Samples, batch_size: int = 256) -> list[np.ndarray]:
    """The outputs of ``model`` on every sample (one array per output, in sample order), run in
    batches of samples of similar size."""
    import torch

    model.eval()
    chunks = []
    if samples.ragged:  # small batches of similar sizes: little padding
        batch_size = min(batch_size, 16)
    with torch.inference_mode():
        for idx, arrays in samples.batches(batch_size):
            out = model(*[torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
            outs = out if isinstance(out, tuple | list) else (out,)
            chunks.append(
                (idx, [(o.float() if o.is_floating_point() else o).numpy() for o in outs])
            )
    return concat_outputs(chunks, len(samples))


def torch_outputs(
    model: torch.nn.Module, dataset: Dataset, batch_size: int = 256
) -> tuple[Any, Any]:
    """Outputs (one array, or a list with one per output) and targets of ``model`` over ``dataset``."""
    samples, targets = read_split(dataset, infer_layouts(dataset), "evaluation")
    outs = torch_run(model, samples, batch_size)
    return (outs[0] if len(outs) == 1 else outs), targets


def _rnn_macs(model: torch.nn.Module, example: Any) -> dict[str, int]:
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
                model(*_args(example))
    finally:
        for h in hooks:
            h.remove()
    return found


def count_macs(model: torch.nn.Module, example: Any) -> int:
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
        model(*_args(example))
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


def torch_latency(model: torch.nn.Module, example: Any, runs: int = 100) -> dict[str, float]:
    """Eager batch latency of ``model`` on ``example`` (one tensor or a tuple; milliseconds
    percentiles)."""
    import torch

    model.eval()
    args = _args(example)
    with torch.inference_mode():
        return time_fn(lambda: model(*args), warmup=10, runs=runs, max_seconds=20.0)
