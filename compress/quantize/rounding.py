"""Learned rounding: choose, weight by weight, whether to round up or down to the int8 grid.

Rounding every weight to the nearest grid point is not what keeps a layer's output closest to its
float output: the errors of neighbouring weights add up over correlated inputs. AdaRound (Nagel et
al., "Up or Down? Adaptive Rounding for Post-Training Quantization", 2020) picks the rounding that
minimises the layer's output error on calibration data, ``|| (W_q - W) X ||²`` with the layer's
input statistics ``H = X Xᵀ``. AdaRound solves it by gradient descent on a relaxation; here the same
objective is solved directly, one flip at a time: starting from nearest rounding, each output
channel flips the weight whose flip lowers its error most, until no flip helps (a greedy descent
that only ever lowers the objective: a second or two for EfficientNet-Lite0's largest layers on a
CPU, about 25 s for a 512-channel 3x3 convolution; filters with more than 8,192 inputs keep nearest
rounding).

Two choices keep the result usable by every format's tool:

- each weight stays on ``floor`` or ``ceil`` of its own grid position, and the largest weight of a
  channel is never moved, so ``absmax / 127`` (the scale onnxruntime, NNCF and ai-edge-quantizer
  compute from the weights) is the same grid and their quantization leaves the weights as they are;
- the layer's input is the *quantized* model's (``xq``) and the target the *float* model's output,
  so the rounding also absorbs the error the layers before it made (the mean of what remains is
  removed by the bias correction that follows).

Input statistics are estimated on sampled positions (every image, a few thousand positions in
all) and shrunk towards their diagonal when positions are few against the filter size (a linear
layer after global pooling sees one vector per image), so that flips fit the data, not its noise.
"""

from __future__ import annotations

from typing import Any

__all__ = ["learned_round", "patches"]

# positions sampled per layer to estimate the input statistics
_POSITIONS = 8192
# ... and at most about this many input values gathered per stream
_PATCH_VALUES = 2**24
# filters with more inputs than this (a k x k matrix per group) are rounded to nearest
_MAX_INPUTS = 8192


def _conv_input(mod: Any, x: Any) -> Any | None:
    """``x`` as the convolution inside ``mod`` sees it (its own static padding applied), or None
    when ``mod`` computes something this module does not know (then nearest rounding is used)."""
    import torch.nn.functional as F
    from torch import nn

    if not isinstance(mod, nn.Conv1d | nn.Conv2d) or mod.padding_mode != "zeros":
        return None
    if isinstance(mod.padding, str):
        return None
    pad = getattr(mod, "static_padding", None)
    if pad is not None:  # EfficientNet-PyTorch's TensorFlow-style "same" padding
        if isinstance(pad, nn.ZeroPad2d | nn.ConstantPad2d) and float(pad.value) == 0.0:
            x = F.pad(x, pad.padding)
        elif type(pad).__name__ != "Identity":
            return None
    elif type(mod).forward not in (nn.Conv1d.forward, nn.Conv2d.forward):
        return None
    return x.unsqueeze(2) if isinstance(mod, nn.Conv1d) else x


def patches(mod: Any, x: Any, idx: Any) -> Any | None:
    """The inputs of ``mod``'s weight at the sampled output positions ``idx`` (flat over samples
    and positions): ``(groups, inputs per group, positions)``; None when ``mod`` is not known."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    if isinstance(mod, nn.Linear):
        flat = x.reshape(-1, x.shape[-1])
        return flat[idx].T.unsqueeze(0)
    xin = _conv_input(mod, x)
    if xin is None:
        return None
    conv1d = isinstance(mod, nn.Conv1d)
    kh, kw = (1, *mod.kernel_size) if conv1d else mod.kernel_size
    sh, sw = (1, *mod.stride) if conv1d else mod.stride
    ph, pw = (0, *mod.padding) if conv1d else mod.padding
    dh, dw = (1, *mod.dilation) if conv1d else mod.dilation
    if ph or pw:
        xin = F.pad(xin, (pw, pw, ph, ph))
    height, width = xin.shape[-2:]
    oh = (height - dh * (kh - 1) - 1) // sh + 1
    ow = (width - dw * (kw - 1) - 1) // sw + 1
    n, r = idx // (oh * ow), idx % (oh * ow)
    y0, x0 = (r // ow) * sh, (r % ow) * sw
    rows = xin.permute(0, 2, 3, 1)  # channels last: each gather below reads whole rows
    taps = [rows[n, y0 + i * dh, x0 + j * dw] for i in range(kh) for j in range(kw)]
    p = torch.stack(taps, 2)  # (positions, C, kh * kw)
    p = p.permute(1, 2, 0).reshape(-1, len(idx))  # (C * kh * kw, positions), as the weight
    return p.reshape(mod.groups, -1, len(idx))


def _positions(mod: Any, y: Any, generator: Any) -> Any:
    """Sampled flat output positions (sample-major), sorted: at most ``_POSITIONS``, fewer when
    the filters are many and large (a depthwise layer's small per-channel statistics need fewer)."""
    import torch
    from torch import nn

    if isinstance(mod, nn.Linear):
        total = y.reshape(-1, y.shape[-1]).shape[0]
        inputs = mod.in_features
    else:
        total = y.shape[0] * (y[0].numel() // y.shape[1])
        inputs = mod.in_channels * mod.weight[0, 0].numel()
    limit = min(_POSITIONS, max(_POSITIONS // 8, _PATCH_VALUES // inputs))
    if total <= limit:
        return torch.arange(total)
    return torch.randperm(total, generator=generator)[:limit].sort().values


def _outputs_at(mod: Any, y: Any, idx: Any) -> Any:
    """``y`` at the flat positions ``idx``: ``(outputs, positions)``."""
    from torch import nn

    if isinstance(mod, nn.Linear):
        return y.reshape(-1, y.shape[-1])[idx].T
    flat = y.reshape(y.shape[0], y.shape[1], -1).transpose(0, 1).reshape(y.shape[1], -1)
    return flat[:, idx]


def learned_round(mod: Any, w: Any, xq: Any, xf: Any, *, generator: Any = None) -> Any | None:
    """Weights of ``mod`` rounded to the per-channel symmetric int8 grid (``absmax / 127``) so that
    its output on the quantized input ``xq`` best matches its float output on ``xf``.

    Args:
        mod: a ``Linear``, ``Conv1d`` or ``Conv2d`` (with zero padding); its weight is not changed.
        w: the float weights (``mod.weight``'s shape).
        xq: the layer's input in the quantized model (already quantized as the runtime does).
        xf: the layer's input in the float model.
        generator: ``torch.Generator`` for the sampled positions (a fixed seed by default).

    Returns:
        The rounded weights (``w``'s shape and dtype), or None when ``mod`` is not supported.
    """
    import torch

    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if w[0].numel() > _MAX_INPUTS or w.dtype != torch.float32:
        return None
    try:
        return _learned(mod, w, xq, xf, generator)
    except (RuntimeError, IndexError, ValueError):  # a layer shape this module does not read
        return None


def _learned(mod: Any, w: Any, xq: Any, xf: Any, generator: Any) -> Any | None:
    import torch

    with torch.no_grad():
        y = _output(mod, w, xq)
        idx = _positions(mod, y, generator)
        pq = patches(mod, xq, idx)
        pf = patches(mod, xf, idx)
        if pq is None or pf is None:
            return None
        groups, k, m = pq.shape
        wg = w.reshape(groups, -1, k).float()
        pq, pf = pq.float(), pf.float()
        if not _matches(mod, wg, y, idx, pq):
            return None
        pq_c = pq - pq.mean(-1, keepdim=True)
        resid = wg @ (pq - pf)  # what the upstream error does to this layer's output
        resid = resid - resid.mean(-1, keepdim=True)
        h = pq_c @ pq_c.transpose(1, 2) / m
        c = resid @ pq_c.transpose(1, 2) / m
        shrink = k / (k + m)  # few positions against the filter size: trust the diagonal more
        diag = torch.diagonal(h, dim1=1, dim2=2)
        h = (1 - shrink) * h + shrink * torch.diag_embed(diag)
        c = (1 - shrink) * c  # the upstream error's estimate is as uncertain
        q = _descend(wg, h, c)
    return q.reshape(w.shape).to(w.dtype)


def _output(mod: Any, w: Any, x: Any) -> Any:
    """``mod``'s output on ``x`` with weights ``w`` and without its bias."""
    from .fxgraph import bias_shape

    saved = mod.weight.data
    try:
        mod.weight.data = w
        y = mod(x)
    finally:
        mod.weight.data = saved
    if mod.bias is not None:
        y = y - mod.bias.view(bias_shape(mod, y))
    return y


def _matches(mod: Any, wg: Any, y: Any, idx: Any, p: Any) -> bool:
    """Whether the patches reproduce ``mod``'s own output ``y`` at the sampled positions (a module
    whose forward does more than its convolution is left to nearest rounding)."""
    mine = (wg @ p).reshape(-1, p.shape[-1])
    theirs = _outputs_at(mod, y, idx).float()
    if mine.shape != theirs.shape:
        return False
    scale = float(theirs.abs().max()) or 1.0
    return float((mine - theirs).abs().max()) <= 1e-3 * scale


def _descend(w: Any, h: Any, c: Any, max_steps: int | None = None) -> Any:
    """Greedy flips between floor and ceil of each weight's grid position that lower
    ``d H dᵀ + 2 d·c`` per output channel (``d``: the weight error); the channel's largest weight
    stays where it is so that the grid does not change. ``w``: ``(groups, rows, k)``."""
    import torch

    scale = w.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    v = w / scale
    lo = torch.floor(v).clamp(-127, 127)
    hi = torch.ceil(v).clamp(-127, 127)
    q = torch.round(v).clamp(-127, 127)
    fixed = (lo == hi) | (w.abs() == w.abs().amax(-1, keepdim=True))
    d = (q - v) * scale  # the weight error now
    delta = (torch.where(q == lo, hi, lo) - q) * scale  # what a flip adds to it
    grad = d @ h + c  # half the gradient of the objective in d
    diag = torch.diagonal(h, dim1=1, dim2=2).unsqueeze(1)  # (groups, 1, k)
    curve = (delta**2 * diag).masked_fill(fixed, float("inf"))  # a flip keeps delta²
    tol = 1e-5 * float(curve[~fixed].mean()) if bool((~fixed).any()) else 0.0
    steps = max_steps if max_steps is not None else 4 * w.shape[-1]
    for _ in range(steps):
        best, at = (2 * delta * grad + curve).min(-1)  # (groups, rows)
        active = best < -tol
        if not bool(active.any()):
            break
        at, on = at.unsqueeze(-1), active.unsqueeze(-1)
        flip = delta.gather(-1, at)
        step = flip * on  # (groups, rows, 1); 0 where the row is done
        d.scatter_add_(-1, at, step)
        delta.scatter_(-1, at, torch.where(on, -flip, flip))  # back is the other way
        grad += step * h.gather(1, at.expand(-1, -1, h.shape[-1]))
    return torch.round((w + d) / scale).clamp(-127, 127) * scale
