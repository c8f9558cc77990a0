"""Post-training quantization in PyTorch, before export: the same rounded weights for every format.

Naive int8 hurts depthwise-separable networks mostly through weight rounding: a depthwise filter has
nine weights per channel, and rounding them shifts the channel's mean output, an error that the next
layers carry and compound (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", 2019). ``apply`` fixes it once, in PyTorch, before any format's tool runs:

1. trace the model with ``torch.fx`` (convolutions and linear layers as leaves) and fold every
   batch norm into the layer before it, as the exporters and runtimes would;
2. walk the graph in execution order with two streams of calibration activations, the float model's
   (the target) and the partly quantized model's (the input each layer really gets);
3. at each convolution / linear layer: quantize its input the way the runtimes do (per-tensor
   uint8 over the float stream's min/max), round its weights to the per-channel symmetric int8
   grid (``absmax / 127``, which onnxruntime, NNCF and ai-edge-quantizer all use, so their own
   weight quantization leaves the weights as they are), and add the mean output error over the
   calibration samples to its bias (empirical bias correction);
4. give channels whose weights are all ~0 but whose bias is not one tiny weight, so that the int32
   bias (``bias / (input scale * weight scale)``) fits (ai-edge-quantizer otherwise drops it).

The result is a float model whose weights already sit on the int8 grid: every format quantizes it
with its own tool and gets the same weights. ``original`` keeps the folded, unrounded model, so a
layer the accuracy search keeps in float gets its own float weights and bias back (a corrected bias
without the rounding it corrects would be wrong). ``simulate`` runs the fake-quantized model with
any set of layers in float, to rank layers for that search cheaply.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .fxgraph import PtqSkipped, bias_shape, fold_batch_norms, trace, weighted

__all__ = ["LayerStat", "PtqResult", "PtqSkipped", "apply", "fold_batch_norms"]

# the int32 bias must fit with this margin (2**31 is the limit)
_BIAS_LIMIT = 2.0**30


@dataclass
class LayerStat:
    """What the walk did to one convolution or linear layer.

    Attributes:
        name: the module path (``_blocks.0._depthwise_conv``).
        kind: the module class (``Conv2d``, ``Linear``, ...).
        macs: multiply-accumulates per sample.
        error_rounded: relative output error (``||q - f||² / ||f||²``) with rounded weights and
            quantized input, before the bias correction.
        error: the same after the bias correction.
        added: the error this layer itself adds: its int8 output against its float output on the
            same (partly quantized) input, relative to the float model's output energy; what
            keeping it float would remove (the ranking of the float-layer search).
        guarded: channels given a tiny weight so that their int32 bias fits.
        first: a first convolution (the input reaches it without passing another one): NNCF's
            overflow fix, on for targets without VNNI, stores its weights in 7 bits.
    """

    name: str
    kind: str
    macs: int
    error_rounded: float
    error: float
    added: float = 0.0
    guarded: int = 0
    first: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.name,
            "kind": self.kind,
            "macs": self.macs,
            "error_rounded": float(f"{self.error_rounded:.4g}"),
            "error": float(f"{self.error:.4g}"),
            "added": float(f"{self.added:.4g}"),
            "guarded_channels": self.guarded,
            "first": self.first,
        }


@dataclass
class PtqResult:
    """The rounded, bias-corrected model and what it took.

    Attributes:
        model: the traced model with batch norms folded, weights on the int8 grid, biases corrected.
        original: the same graph with batch norms folded and the original float weights.
        layers: one record per corrected layer, in execution order.
        samples: calibration samples the walk used.
        seconds: how long the walk took.
        folded: batch norms folded.
        ranges: the float input range of each corrected call (graph node name -> (min, max)).
        activations: ``uint8`` (asymmetric), ``int8`` (symmetric) or ``none`` (not simulated).
        rounding: ``nearest`` or ``learned`` (layers ``quantize/rounding.py`` cannot read use nearest).
    """

    model: Any
    original: Any
    layers: list[LayerStat]
    samples: int
    seconds: float
    folded: int
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    activations: str = "uint8"
    rounding: str = "nearest"

    def to_json(self) -> dict[str, Any]:
        worst = sorted(self.layers, key=lambda s: -s.error)[:5]
        return {
            "method": "bias-correction",
            "rounding": self.rounding,
            "samples": self.samples,
            "seconds": round(self.seconds, 1),
            "batch_norms_folded": self.folded,
            "layers": len(self.layers),
            "guarded_channels": sum(s.guarded for s in self.layers),
            "activations_simulated": self.activations,
            "largest_errors": [s.to_json() for s in worst],
        }

    @property
    def macs(self) -> dict[str, int]:
        """Multiply-accumulates per sample of each corrected layer (module path -> MACs)."""
        return {s.name: s.macs for s in self.layers}

    @property
    def added(self) -> dict[str, float]:
        """The error each corrected layer adds (module path -> ``LayerStat.added``)."""
        return {s.name: s.added for s in self.layers}

    def simulate(self, x: Any, float_layers: Collection[str] = (), batch: int = 32) -> np.ndarray:
        """Outputs of the fake-quantized model (int8 weights, quantized layer inputs) on ``x``,
        with ``float_layers`` (module paths) in float: their original weights and float inputs."""
        import torch

        keep = set(float_layers)
        outs = []
        with torch.no_grad():
            for i in range(0, len(x), batch):
                xb = torch.as_tensor(np.asarray(x[i : i + batch]))
                outs.append(_run_sim(self, xb, keep).numpy())
        return np.concatenate(outs)


def _fake_quant(x: Any, lo: float, hi: float, activations: str) -> Any:
    """Per-tensor int8 activations as the runtimes compute them (range widened to include 0)."""
    import torch

    if activations == "none":
        return x
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if activations == "int8":
        s = max(abs(lo), abs(hi), 1e-8) / 127
        return torch.clamp(torch.round(x / s), -127, 127) * s
    s = max(hi - lo, 1e-8) / 255
    z = round(-lo / s)
    return (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s


def _round_weights(w: Any, per_channel: bool) -> Any:
    import torch

    dims = tuple(range(1, w.dim())) if per_channel else tuple(range(w.dim()))
    s = w.abs().amax(dims, keepdim=True).clamp_min(1e-12) / 127
    return torch.clamp(torch.round(w / s), -127, 127) * s


def _guard_dead_channels(w: Any, b: Any, in_scale: float) -> int:
    """Give each channel whose weights are ~0 but whose bias is not one weight large enough that
    its int32 bias fits; returns the channels changed (the output changes by < 1e-3)."""
    if b is None:
        return 0
    absmax = w.abs().flatten(1).amax(1)
    need = b.abs() * 127 / (max(in_scale, 1e-8) * _BIAS_LIMIT)
    bad = (absmax < need).nonzero().flatten().tolist()
    for ch in bad:
        flat = w[ch].view(-1)
        i = int(flat.abs().argmax())
        flat[i] = need[ch] if flat[i] >= 0 else -need[ch]
    return len(bad)


def _channel_dims(mod: Any, y: Any) -> tuple[int, ...]:
    from torch import nn

    if isinstance(mod, nn.Linear):
        return tuple(range(y.dim() - 1))
    return (0, *range(2, y.dim()))


def _macs(mod: Any, y: Any) -> int:
    per_output = mod.weight[0].numel()  # inputs per output element (one group's filter)
    return int(y[0].numel() * per_output)


def _last_uses(graph: Any) -> dict[Any, list[Any]]:
    """node -> the values whose last use it is (freed after it runs)."""
    seen: set[Any] = set()
    frees: dict[Any, list[Any]] = {}
    for node in reversed(list(graph.nodes)):
        for inp in node.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                frees.setdefault(node, []).append(inp)
    return frees


def _fetch(gm: Any, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _map(env: dict[Any, Any], a: Any) -> Any:
    from torch import fx

    return fx.node.map_arg(a, lambda n: env[n])


def apply(
    model: Any,
    calibration: np.ndarray,
    *,
    samples: int = 64,
    per_channel: bool = True,
    activations: str = "uint8",
    rounding: str = "nearest",
    progress: Any = None,
) -> PtqResult:
    """Fold batch norms, round weights to the int8 grid and correct biases layer by layer.

    Args:
        model: the float model (not changed).
        calibration: calibration inputs, samples first (the first ``samples`` are used).
        samples: how many calibration samples the walk uses (all at once: memory grows with it).
        per_channel: per-output-channel weight grid (False: one grid per tensor).
        activations: how layer inputs are quantized: ``uint8`` (asymmetric, the CPU runtimes'
            scheme), ``int8`` (symmetric) or ``none``.
        rounding: ``nearest`` grid point, or ``learned`` (per weight up or down, whichever keeps
            the layer's output closest to the float model's: ``quantize/rounding.py``).
        progress: wraps the node iterator (``edgesmith.progress.track``), or None.

    Returns:
        The corrected model (``model``), the folded float one (``original``), per-layer records.

    Raises:
        PtqSkipped: the model cannot be traced by ``torch.fx``.
    """
    import torch

    if rounding not in ("nearest", "learned"):
        raise ValueError(f"rounding must be 'nearest' or 'learned', got {rounding!r}")
    if not per_channel:  # learned rounding keeps the per-channel grid; per-tensor is nearest
        rounding = "nearest"
    t0 = time.perf_counter()
    work = trace(model)
    folded = fold_batch_norms(work)
    original = copy.deepcopy(work)
    for p in [*work.parameters(), *original.parameters()]:
        p.requires_grad_(False)
    x = torch.as_tensor(np.asarray(calibration[:samples]), dtype=torch.float32)
    fmods, qmods = dict(original.named_modules()), dict(work.named_modules())
    env_f: dict[Any, Any] = {}
    env_q: dict[Any, Any] = {}
    frees = _last_uses(work.graph)
    stats: list[LayerStat] = []
    ranges: dict[str, tuple[float, float]] = {}
    done: set[str] = set()
    nodes = list(work.graph.nodes)
    placeholders = 0
    with torch.no_grad():
        for node in progress(nodes) if progress else nodes:
            if node.op == "placeholder":
                if placeholders:
                    raise PtqSkipped("the model takes several inputs")
                placeholders += 1
                env_f[node], env_q[node] = x, x.clone()
            elif node.op == "get_attr":
                env_f[node], env_q[node] = (
                    _fetch(original, node.target),
                    _fetch(work, node.target),
                )
            elif node.op in ("call_function", "call_method"):
                for env in (env_f, env_q):
                    args, kwargs = _map(env, node.args), _map(env, node.kwargs)
                    if node.op == "call_function":
                        env[node] = node.target(*args, **kwargs)
                    else:
                        env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "call_module":
                fmod, qmod = fmods[node.target], qmods[node.target]
                f_args, q_args = _map(env_f, node.args), _map(env_q, node.args)
                kwargs_f, kwargs_q = _map(env_f, node.kwargs), _map(env_q, node.kwargs)
                if not weighted(qmod) or len(f_args) != 1 or kwargs_f:
                    env_f[node] = fmod(*f_args, **kwargs_f)
                    env_q[node] = qmod(*q_args, **kwargs_q)
                else:
                    xf, x_in = f_args[0], q_args[0]
                    lo, hi = float(xf.min()), float(xf.max())
                    ranges[node.name] = (lo, hi)
                    xq = _fake_quant(x_in, lo, hi, activations)
                    yf = fmod(xf)
                    if node.target in done:  # a layer called twice: corrected at its first call
                        env_f[node], env_q[node] = yf, qmod(xq)
                    else:
                        done.add(node.target)
                        stat, yq = _correct(
                            node.target, qmod, xq, yf, lo, hi, per_channel, xf, rounding
                        )
                        if fmod.bias is None:  # the float twin gets the bias slot too (zeros),
                            # so a layer kept float gets its own bias back, not the correction
                            fmod.bias = torch.nn.Parameter(
                                torch.zeros_like(qmod.bias), requires_grad=False
                            )
                        own = fmod(x_in)  # this layer in float on the same input
                        energy = float((yf.double() ** 2).mean()) or 1.0
                        stat.added = float(((yq - own).double() ** 2).mean()) / energy
                        stats.append(stat)
                        env_f[node], env_q[node] = yf, yq
            elif node.op == "output":
                break
            for dead in frees.get(node, ()):
                env_f.pop(dead, None)
                env_q.pop(dead, None)
    work.recompile()
    first = _first_convolutions(work)
    for stat in stats:
        stat.first = stat.name in first
    return PtqResult(
        work,
        original,
        stats,
        len(x),
        time.perf_counter() - t0,
        folded,
        ranges,
        activations,
        rounding,
    )


def _first_convolutions(gm: Any) -> set[str]:
    """Module paths of the convolutions the input reaches without passing another convolution
    (NNCF's "first layer" for its overflow fix: a breadth-first walk from each input)."""
    from torch import nn

    modules = dict(gm.named_modules())
    found: set[str] = set()
    queue = [n for n in gm.graph.nodes if n.op == "placeholder"]
    seen: set[Any] = set()
    while queue:
        node = queue.pop(0)
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            mod = modules.get(user.target) if user.op == "call_module" else None
            if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                found.add(str(user.target))
            else:
                queue.append(user)
    return found


def _correct(
    name: str,
    mod: Any,
    xq: Any,
    yf: Any,
    lo: float,
    hi: float,
    per_channel: bool,
    xf: Any = None,
    rounding: str = "nearest",
) -> tuple[LayerStat, Any]:
    """Round ``mod``'s weights and correct its bias so that ``mod(xq)`` matches ``yf`` on average;
    returns the layer's record and its corrected output."""
    import torch
    from torch import nn

    w = mod.weight.data
    in_scale = (max(hi, 0.0) - min(lo, 0.0)) / 255
    guarded = _guard_dead_channels(w, mod.bias.data if mod.bias is not None else None, in_scale)
    rounded = None
    if rounding == "learned" and per_channel and xf is not None:
        from .rounding import learned_round

        rounded = learned_round(mod, w, xq, xf)
    mod.weight.data = rounded if rounded is not None else _round_weights(w, per_channel)
    if mod.bias is None:
        out = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
        mod.bias = nn.Parameter(torch.zeros(out, dtype=w.dtype), requires_grad=False)
    yq = mod(xq)
    energy = float((yf.double() ** 2).mean()) or 1.0
    before = float(((yq - yf).double() ** 2).mean()) / energy
    shift = (yf - yq).mean(_channel_dims(mod, yf))
    mod.bias.data += shift
    yq = yq + shift.view(bias_shape(mod, yq))
    after = float(((yq - yf).double() ** 2).mean()) / energy
    return LayerStat(name, type(mod).__name__, _macs(mod, yf), before, after, 0.0, guarded), yq


def _run_sim(res: PtqResult, x: Any, keep: set[str]) -> Any:
    """One stream through the corrected model with fake-quantized layer inputs (see ``simulate``)."""
    work, original = res.model, res.original
    fmods, qmods = dict(original.named_modules()), dict(work.named_modules())
    env: dict[Any, Any] = {}
    frees = _last_uses(work.graph)
    out = None
    for node in work.graph.nodes:
        if node.op == "placeholder":
            env[node] = x
        elif node.op == "get_attr":
            env[node] = _fetch(work, node.target)
        elif node.op == "call_function":
            env[node] = node.target(*_map(env, node.args), **_map(env, node.kwargs))
        elif node.op == "call_method":
            args = _map(env, node.args)
            env[node] = getattr(args[0], node.target)(*args[1:], **_map(env, node.kwargs))
        elif node.op == "call_module":
            args, kwargs = _map(env, node.args), _map(env, node.kwargs)
            if node.name in res.ranges:
                if node.target in keep:
                    env[node] = fmods[node.target](*args)
                else:
                    lo, hi = res.ranges[node.name]
                    env[node] = qmods[node.target](_fake_quant(args[0], lo, hi, res.activations))
            else:
                env[node] = qmods[node.target](*args, **kwargs)
        elif node.op == "output":
            out = _map(env, node.args[0])
            break
        for dead in frees.get(node, ()):
            env.pop(dead, None)
    if isinstance(out, tuple | list):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out
