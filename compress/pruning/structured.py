"""Structured (channel, hidden-unit, head) pruning toward a MACs target, on torch-pruning's graph.

The dependency graph couples every layer that shares a channel dimension (a convolution, its
BatchNorm, the next layer's input, residual additions, depthwise convolutions); one *group* is
pruned at a time. :class:`StructuredPruner` adds what the recipe contract needs around it:

- a target in MACs (counted at the dispatcher, ``edgesmith.measure.count_macs``) reached by small
  schedule steps, each followed by a count, instead of a channel ratio;
- channel counts rounded to the nearest multiple of ``round_to`` (torch-pruning rounds down at the
  first step, which removes a whole multiple at once);
- the output layer kept automatically, ``keep_first`` for the first layer, ``ignore`` patterns;
- recurrent layers through :class:`~edgesmith.compress.pruning.recurrent.RecurrentPruner`, and
  ``nn.MultiheadAttention`` converted to :class:`~edgesmith.compress.pruning.attention.PrunableAttention`
  whose heads are removed on the same schedule (the embedding width is kept);
- a clear error naming any layer that cannot be pruned, and why.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from edgesmith.compress.pruning.attention import (
    PrunableAttention,
    convert_attention_,
    head_importance,
    prune_heads_,
    unconvertible_reason,
)
from edgesmith.compress.pruning.importance import GroupImportance, accumulate_gradients_
from edgesmith.compress.pruning.recurrent import RECURRENT_TYPES, RecurrentPruner, unprunable_reason
from edgesmith.errors import CompressionError

__all__ = ["StructuredPruner", "find_first_layer", "find_output_layers", "layer_widths"]

log = logging.getLogger(__name__)

_PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear, *RECURRENT_TYPES)


class _NearestRoundingPruner(tp.pruner.MetaPruner):
    """torch-pruning's pruner with channel counts rounded to the *nearest* multiple of round_to."""

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        remaining = current_channels - n_pruned
        rounded = max(round_to, round(remaining / round_to) * round_to)
        return max(current_channels - rounded, 0)


class AttentionPruner(tp.pruner.BasePruningFunc):
    """Tells the dependency graph that an attention layer reads and writes ``embed_dim`` channels.

    The embedding width is never pruned (attention layers are always in the ignored set, which
    keeps every group that crosses the residual stream intact); heads are pruned separately.
    """

    TARGET_MODULES = (PrunableAttention,)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> Any:
        raise RuntimeError("the embedding width of attention layers is not pruned")

    prune_in_channels = prune_out_channels  # intra-layer coupling: in and out are one width

    def get_out_channels(self, layer: nn.Module) -> int:
        assert isinstance(layer, PrunableAttention)
        return layer.embed_dim

    def get_in_channels(self, layer: nn.Module) -> int:
        return self.get_out_channels(layer)


class _OpaqueRecurrent(torch.autograd.Function):
    """Runs an RNN layer as one autograd node (inputs: the sequence and the weights).

    Depending on the kernel (oneDNN or the reference implementation used for projections,
    dropout or some dtypes), an RNN's autograd graph is one fused node or hundreds of
    gate-splitting ops; torch-pruning traces the latter as channel splits and fails with an
    IndexError (DESIGN.md section 7). During tracing every RNN layer is made one node.
    """

    @staticmethod
    def forward(ctx: Any, run: Any, x: torch.Tensor, *tensors: torch.Tensor) -> Any:  # type: ignore[override]
        with torch.no_grad():
            out, state = run(x)
        states = state if isinstance(state, tuple) else (state,)
        return (out, *states)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # type: ignore[override]
        raise RuntimeError("only used to trace the dependency graph")


class _opaque_recurrent_layers:
    """Context manager: RNN layers of ``model`` run through :class:`_OpaqueRecurrent`."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.RNNBase)]

    def __enter__(self) -> None:
        for layer in self.layers:
            original = layer.forward

            def forward(
                x: Any, hx: Any = None, original: Any = original, layer: Any = layer
            ) -> Any:
                if not isinstance(x, torch.Tensor):  # PackedSequence: leave it as it is
                    return original(x, hx)
                extra = [t for t in (hx if isinstance(hx, tuple) else (hx,)) if t is not None]
                outs = _OpaqueRecurrent.apply(
                    lambda inp: original(inp, hx), x, *extra, *layer.parameters()
                )
                state = outs[1] if len(outs) == 2 else (outs[1], outs[2])
                return outs[0], state

            layer.forward = forward  # type: ignore[method-assign]

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers:
            del layer.forward


def _leaf_order(model: nn.Module, example: torch.Tensor) -> tuple[list[str], Any, dict[int, str]]:
    """Names of the parameterised layers in execution order, the output, and output-id -> name."""
    order: list[str] = []
    produced: dict[int, str] = {}
    # every recorded output stays alive until the model's outputs exist: a freed one's id may
    # be reused by a later tensor (an output computed by plain tensor ops), naming the wrong layer
    alive: list[torch.Tensor] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (*_PRUNABLE, PrunableAttention, nn.MultiheadAttention)):

            def hook(m: nn.Module, i: Any, o: Any, name: str = name) -> None:
                order.append(name)
                first = o[0] if isinstance(o, tuple) else o
                if isinstance(first, torch.Tensor):
                    produced[id(first)] = name
                    alive.append(first)

            hooks.append(module.register_forward_hook(hook))
    try:
        model.eval()
        with torch.no_grad():
            out = model(*example) if isinstance(example, tuple | list) else model(example)
    finally:
        for h in hooks:
            h.remove()
    return order, out, produced


def find_output_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The layers whose outputs are the model's outputs (their output width must not change).

    Falls back to the last parameterised layer executed when an output is computed by a plain
    tensor op after it.
    """
    order, out, produced = _leaf_order(model, example)
    outs = out if isinstance(out, tuple | list) else [out]
    names = [produced[id(o)] for o in outs if isinstance(o, torch.Tensor) and id(o) in produced]
    if not names and order:
        names = [order[-1]]
    return names


def find_first_layer(model: nn.Module, example: torch.Tensor) -> str | None:
    """The first parameterised layer executed (usually the stem convolution)."""
    order, _, _ = _leaf_order(model, example)
    return order[0] if order else None


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every prunable layer (channels, features, hidden units, heads)."""
    widths: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            widths[name] = m.out_features
        elif isinstance(m, nn.RNNBase):
            widths[name] = m.hidden_size
        elif isinstance(m, PrunableAttention | nn.MultiheadAttention):
            widths[name] = m.num_heads
    return widths


def _match(patterns: Sequence[str], names: Iterable[str]) -> tuple[set[str], list[str]]:
    names = list(names)
    matched: set[str] = set()
    unmatched = []
    for pat in patterns:
        hits = [n for n in names if n and (n == pat or fnmatch.fnmatchcase(n, pat))]
        if not hits:
            unmatched.append(pat)
        matched.update(hits)
    return matched, unmatched


class StructuredPruner:
    """Removes channels, hidden units and attention heads from ``model`` in place, step by step.

    Args:
        model: the model to prune (edited in place; ``nn.MultiheadAttention`` layers are
            replaced by :class:`PrunableAttention`).
        example: one input batch for tracing.
        importance: ``l1``, ``l2``, ``bn_scale`` or ``taylor``.
        scope: ``layer`` (every layer loses the same fraction) or ``global`` (channels ranked
            across layers).
        round_to: keep channel counts at multiples of this (None: no rounding).
        ignore: names or glob patterns of layers whose output width is kept.
        keep_first: keep the first layer's output width too.
        max_layer_ratio: never remove more than this fraction of one layer's channels.
        resolution: schedule steps between 0 and ``max_layer_ratio``.
        grad_batches: for ``taylor``: a callable returning (input, target) batches.

    Example:
        >>> pruner = StructuredPruner(model, x, importance="l2", round_to=8)  # doctest: +SKIP
        >>> pruner.prune_to_macs(pruner.base_macs // 2)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        *,
        importance: str = "l2",
        scope: str = "layer",
        round_to: int | None = 8,
        ignore: Sequence[str] = (),
        keep_first: bool = False,
        max_layer_ratio: float = 0.9,
        resolution: int = 100,
        grad_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None,
        grad_loss: Any = None,
    ) -> None:
        from edgesmith.measure import count_macs

        self.model, self.example = model, example
        self.importance_name = importance
        self.grad_batches, self.grad_loss = grad_batches, grad_loss
        if importance == "taylor" and grad_batches is None:
            raise ValueError("taylor importance needs grad_batches")
        named = dict(model.named_modules())
        user_ignored, unmatched = _match(ignore, named)
        if unmatched:
            import difflib

            close = difflib.get_close_matches(unmatched[0], [n for n in named if n], n=3)
            raise CompressionError(
                f"prune 'ignore' names no layer of {type(model).__name__}: {', '.join(unmatched)}",
                hint=(f"did you mean {', '.join(close)}? " if close else "")
                + "use module names as in model.named_modules(), or glob patterns such as 'blocks.*.mlp'",
            )
        ignored_modules = {named[n] for n in user_ignored}
        self._check_prunable(named, ignored_modules)
        if importance == "bn_scale" and not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
        ):
            raise CompressionError(
                f"importance 'bn_scale' ranks channels by BatchNorm scales, but {type(model).__name__} has no BatchNorm layer",
                hint="use importance l1, l2 or taylor",
            )
        self.converted = convert_attention_(
            model,
            skip=[m for m in ignored_modules if isinstance(m, nn.MultiheadAttention)],
        )
        named = dict(model.named_modules())
        ignored_modules = {named[n] for n in user_ignored if n in named}
        self.kept = sorted(find_output_layers(model, example))
        if keep_first:
            first = find_first_layer(model, example)
            if first:
                self.kept.append(first)
        ignored_modules |= {named[n] for n in self.kept}
        self.attention = {
            n: m
            for n, m in named.items()
            if isinstance(m, PrunableAttention) and m not in ignored_modules
        }
        attention_all = [
            m for m in named.values() if isinstance(m, PrunableAttention | nn.MultiheadAttention)
        ]
        self.ignored_names = sorted(user_ignored | set(self.kept))
        rp = RecurrentPruner()
        # the graph is traced through autograd: a frozen model (a teacher) must record it too
        frozen = [p for p in model.parameters() if not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)
        with warnings.catch_warnings(), torch.enable_grad(), _opaque_recurrent_layers(model):
            warnings.simplefilter("ignore")
            self.pruner = _NearestRoundingPruner(
                model,
                example,
                importance=GroupImportance(importance),
                global_pruning=scope == "global",
                pruning_ratio=max_layer_ratio,
                max_pruning_ratio=max_layer_ratio,
                iterative_steps=resolution,
                ignored_layers=list(ignored_modules) + attention_all,
                round_to=round_to,
                customized_pruners={
                    nn.LSTM: rp,
                    nn.GRU: rp,
                    nn.RNN: rp,
                    PrunableAttention: AttentionPruner(),
                },
                root_module_types=[nn.modules.conv._ConvNd, nn.Linear, *RECURRENT_TYPES],
            )
        for p in frozen:
            p.requires_grad_(False)
        self.initial_heads = {n: m.num_heads for n, m in self.attention.items()}
        groups = list(
            self.pruner.DG.get_all_groups(
                ignored_layers=self.pruner.ignored_layers,
                root_module_types=self.pruner.root_module_types,
            )
        )
        if not groups and not any(h > 1 for h in self.initial_heads.values()):
            raise CompressionError(
                f"nothing to prune in {type(model).__name__}: every layer is kept ({', '.join(self.ignored_names) or 'none'})",
                hint="remove layers from the prune stage's 'ignore' list",
            )
        self.widths_before = layer_widths(model)
        self.base_macs = count_macs(model, example)
        self.macs = self.base_macs

    @staticmethod
    def _check_prunable(named: dict[str, nn.Module], ignored: set[nn.Module]) -> None:
        for name, m in named.items():
            if m in ignored:
                continue
            reason = None
            if isinstance(m, nn.RNNBase):
                reason = unprunable_reason(m)
            elif isinstance(m, nn.MultiheadAttention):
                reason = unconvertible_reason(m)
                reason = f"its heads cannot be separated: {reason}" if reason else None
            if reason:
                raise CompressionError(
                    f"layer '{name}' ({type(m).__name__}) cannot be pruned: {reason}",
                    hint=f"keep it by adding it to the prune stage's ignore list: ignore: ['{name}']",
                )

    def step(self, to: int | None = None) -> bool:
        """Advance the schedule by one step (or straight to step ``to``) and prune.

        Returns:
            False when the schedule was already exhausted.
        """
        from edgesmith.measure import count_macs

        pr = self.pruner
        if pr.current_step >= pr.iterative_steps:
            return False
        if to is not None and to > pr.current_step + 1:
            # torch-pruning prunes every step relative to the initial widths: skipping ahead
            # prunes to that step's ratio at once
            pr.current_step = min(to, pr.iterative_steps) - 1
        before = layer_widths(self.model)
        if self.importance_name == "taylor":
            assert self.grad_batches is not None
            accumulate_gradients_(self.model, self.grad_batches(), self.grad_loss)
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            for group in pr.step(interactive=True) or ():
                if len(group[0].idxs) > 0:
                    group.prune()
        ratio = pr.per_step_pruning_ratio[pr.current_step]
        for name, attn in self.attention.items():
            target = max(1, round(self.initial_heads[name] * (1 - ratio)))
            if attn.num_heads > target:
                imp = head_importance(attn, taylor=self.importance_name == "taylor")
                keep = torch.argsort(imp, descending=True)[:target].tolist()
                prune_heads_(attn, keep)
        if self.importance_name == "taylor":
            self.model.zero_grad(set_to_none=True)
        if layer_widths(self.model) != before:  # most small steps round to no change at all
            self.macs = count_macs(self.model, self.example)
        return True

    def prune_to_macs(self, target: int) -> int:
        """Step until the model has at most ``target`` MACs; returns the MACs reached.

        Raises:
            CompressionError: the schedule ended (``max_layer_ratio`` everywhere) above the target.
        """
        # Under uniform pruning MACs shrink about quadratically with the kept width; jump to
        # a step a little short of that estimate, then walk in single steps.
        if self.macs > target:
            pr = self.pruner
            ratio = 1 - math.sqrt(max(target, 1) / self.base_macs)
            jump = int(0.85 * ratio / pr.max_pruning_ratio * pr.iterative_steps)
            if jump > pr.current_step + 1:
                self.step(to=jump)
        while self.macs > target:
            if not self.step():
                done = 1 - self.macs / self.base_macs
                want = 1 - target / self.base_macs
                raise CompressionError(
                    f"cannot remove {want:.1%} of the MACs of {type(self.model).__name__}: stopped at {done:.1%} "
                    f"with {self.pruner.max_pruning_ratio:.0%} of every prunable layer removed "
                    f"(kept whole: {', '.join(self.ignored_names) or 'nothing'})",
                    hint="lower 'sparsity', raise 'max_layer_ratio', or ignore fewer layers",
                )
        return self.macs

    def changed_widths(self) -> dict[str, list[int]]:
        """``{layer: [width before, width after]}`` for every layer that lost channels or heads."""
        after = layer_widths(self.model)
        return {
            n: [w, after[n]] for n, w in self.widths_before.items() if n in after and after[n] != w
        }
