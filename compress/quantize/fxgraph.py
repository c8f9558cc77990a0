"""The model as a ``torch.fx`` graph for post-training quantization (:mod:`.ptq`): traced with
convolutions and linear layers as leaves, batch norms folded into the layer before them, as the
exporters and runtimes would."""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PtqSkipped", "bias_shape", "fold_batch_norms", "trace", "weighted"]


class PtqSkipped(Exception):
    """The model cannot be walked (``torch.fx`` cannot trace it); formats quantize it as exported."""


def weighted(mod: Any) -> bool:
    """Whether ``mod`` is a convolution or linear layer (a layer with int8 weights)."""
    from torch import nn

    return isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear)


def trace(model: Any) -> Any:
    """A ``torch.fx.GraphModule`` of a copy of ``model`` (in eval mode) with convolutions and
    linear layers as leaves.

    Raises:
        PtqSkipped: ``torch.fx`` cannot trace the model (data-dependent control flow, ...).
    """
    from torch import fx

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: Any, qualname: str) -> bool:
            return weighted(m) or super().is_leaf_module(m, qualname)

    model = copy.deepcopy(model).eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), "")
        raise PtqSkipped(
            f"torch.fx cannot trace the model: {type(exc).__name__}: {first[:160]}"
        ) from None
    return fx.GraphModule(model, graph)


def fold_batch_norms(gm: Any) -> int:
    """Fold each batch norm that directly follows a convolution or linear layer into it, in place.

    Returns:
        How many were folded.
    """
    import torch
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}  # a module called at several places cannot take one node's BN
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(
            modules.get(node.target), nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d
        ):
            continue
        prev = node.args[0] if node.args else None
        if getattr(prev, "op", None) != "call_module" or len(prev.users) != 1:
            continue
        if calls.get(prev.target, 0) != 1:
            continue
        layer, bn = modules.get(prev.target), modules[node.target]
        if not weighted(layer) or not bn.track_running_stats or bn.running_mean is None:
            continue
        if isinstance(layer, nn.Linear) and layer.out_features != bn.num_features:
            continue
        if not isinstance(layer, nn.Linear) and layer.out_channels != bn.num_features:
            continue
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        if isinstance(layer, nn.Linear):
            w, b = fuse_linear_bn_weights(
                layer.weight, bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
        else:
            w, b = fuse_conv_bn_weights(
                layer.weight, bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
        layer.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        layer.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


def bias_shape(mod: Any, y: Any) -> tuple[int, ...]:
    """The shape that broadcasts ``mod``'s bias over its output ``y`` (channels last for a linear
    layer, second for a convolution)."""
    from torch import nn

    if isinstance(mod, nn.Linear):
        return (-1,)
    return (1, -1, *([1] * (y.dim() - 2)))
