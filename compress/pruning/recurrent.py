"""Hidden-size pruning of recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) for torch-pruning.

torch-pruning 1.6 ships an LSTM pruner that slices the gate blocks inconsistently (DESIGN.md
section 7: an IndexError, or a silently broken layer). :class:`RecurrentPruner` replaces it: one
hidden unit is removed from every gate block of every layer and direction, from the recurrent
weights' columns, and from the input columns of the next layer, so the layer stays a valid
``nn.LSTM``/``nn.GRU`` with a smaller ``hidden_size``. It is registered with the dependency graph
as a customized pruner, so the consumers of the hidden state (a classifier, a next layer) follow.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from edgesmith.compress.pruning.scores import weight_scores

__all__ = ["RECURRENT_TYPES", "RecurrentPruner", "recurrent_unit_importance", "unprunable_reason"]

RECURRENT_TYPES = (nn.LSTM, nn.GRU, nn.RNN)


def _gates(layer: nn.RNNBase) -> int:
    return {"LSTM": 4, "GRU": 3}.get(layer.mode, 1)


def _suffixes(layer: nn.RNNBase) -> list[str]:
    return ["", "_reverse"] if layer.bidirectional else [""]


def unprunable_reason(layer: nn.Module) -> str | None:
    """Why the hidden size of ``layer`` cannot be pruned, or None if it can."""
    if isinstance(layer, nn.LSTM) and layer.proj_size > 0:
        return "an LSTM with proj_size > 0 feeds projected states back into the gates"
    return None


def _select(param: nn.Parameter, keep: torch.Tensor, dim: int) -> nn.Parameter:
    out = nn.Parameter(
        torch.index_select(param.data, dim, keep.to(param.device)).contiguous(),
        requires_grad=param.requires_grad,
    )
    if param.grad is not None:
        out.grad = torch.index_select(param.grad, dim, keep.to(param.device)).contiguous()
    return out


class RecurrentPruner(tp.pruner.BasePruningFunc):
    """torch-pruning kernel for the hidden units (out) and input features (in) of RNN layers.

    The graph sees ``hidden_size * directions`` output channels in ``directions`` channel groups,
    so a bidirectional layer always loses the same units in both directions.
    """

    TARGET_MODULES = RECURRENT_TYPES

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, nn.RNNBase)
        hidden = layer.hidden_size
        drop = {int(i) % hidden for i in idxs}
        keep = torch.tensor([i for i in range(hidden) if i not in drop], dtype=torch.long)
        rows = torch.cat([keep + g * hidden for g in range(_gates(layer))])
        dirs = len(_suffixes(layer))
        prev_cols = torch.cat([keep + d * hidden for d in range(dirs)])
        for n in range(layer.num_layers):
            for sfx in _suffixes(layer):
                for kind in ("ih", "hh"):
                    name = f"weight_{kind}_l{n}{sfx}"
                    w = _select(getattr(layer, name), rows, 0)
                    if kind == "hh":
                        w = _select(w, keep, 1)
                    elif n > 0:
                        w = _select(w, prev_cols, 1)
                    setattr(layer, name, w)
                    if layer.bias:
                        bname = f"bias_{kind}_l{n}{sfx}"
                        setattr(layer, bname, _select(getattr(layer, bname), rows, 0))
        layer.hidden_size = len(keep)
        _refresh(layer)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, nn.RNNBase)
        drop = {int(i) for i in idxs}
        keep = torch.tensor([i for i in range(layer.input_size) if i not in drop], dtype=torch.long)
        for sfx in _suffixes(layer):
            name = f"weight_ih_l0{sfx}"
            setattr(layer, name, _select(getattr(layer, name), keep, 1))
        layer.input_size = len(keep)
        _refresh(layer)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        assert isinstance(layer, nn.RNNBase)
        return layer.hidden_size * len(_suffixes(layer))

    def get_in_channels(self, layer: nn.Module) -> int:
        assert isinstance(layer, nn.RNNBase)
        return layer.input_size

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        assert isinstance(layer, nn.RNNBase)
        return len(_suffixes(layer))


def _refresh(layer: nn.RNNBase) -> None:
    """RNN modules cache a flat list of their weights; rebuild it after replacing parameters."""
    layer._init_flat_weights()


def recurrent_unit_importance(layer: nn.RNNBase, p: int = 2, taylor: bool = False) -> torch.Tensor:
    """Importance of each hidden unit: the norm of every weight that reads or writes it.

    Args:
        layer: an LSTM/GRU/RNN.
        p: the norm degree for magnitude importance.
        taylor: use |weight x gradient| (first-order Taylor) instead of |weight|^p.

    Returns:
        A tensor of ``hidden_size * directions`` scores (repeated per direction, since both
        directions lose the same units).
    """
    hidden, gates = layer.hidden_size, _gates(layer)
    score = torch.zeros(hidden)
    with torch.no_grad():
        for name, v in weight_scores(layer.named_parameters(), p, taylor):
            # rows: gate blocks of hidden units (weights and biases of every layer)
            score += v.reshape(gates, hidden, -1).sum(dim=(0, 2))
            if name.startswith("weight_hh"):  # columns: the recurrent input
                score += v.sum(0)
            elif name.startswith("weight_ih") and not name.startswith("weight_ih_l0"):
                score += v.sum(0).reshape(-1, hidden).sum(0)  # columns: the layer below
    return score.repeat(len(_suffixes(layer)))
