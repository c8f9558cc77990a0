"""Attention-head pruning: ``nn.MultiheadAttention`` becomes :class:`PrunableAttention`.

``nn.MultiheadAttention`` ties its inner width to ``embed_dim`` (``num_heads * head_dim ==
embed_dim``), so a head cannot be removed from it. :class:`PrunableAttention` computes the same
function with separate q/k/v/out projections whose inner width is ``num_heads * head_dim``;
removing a head removes ``head_dim`` rows from q, k and v and as many columns from the output
projection. The embedding (residual) width stays as it is. The module exports to ONNX through
``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgesmith.compress.pruning.scores import weight_scores

__all__ = [
    "HEAD_ADAPTERS",
    "AttentionHeads",
    "PrunableAttention",
    "attention_heads",
    "convert_attention_",
    "head_importance",
    "prune_attention_heads_",
    "prune_heads_",
    "unconvertible_reason",
]


class PrunableAttention(nn.Module):
    """A drop-in replacement for ``nn.MultiheadAttention`` whose heads can be removed.

    Args:
        embed_dim: width of the query input and of the output.
        num_heads: attention heads.
        head_dim: width of each head (``embed_dim // num_heads`` for a converted layer).
        kdim / vdim: widths of the key and value inputs (default ``embed_dim``).
        bias: projections with biases.
        dropout: dropout on the attention weights while training.
        batch_first: inputs are (batch, seq, feature) instead of (seq, batch, feature).
    """

    # no packed q/k/v projection: ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder``
    # read these to choose their fused fast path, which they then skip for the plain forward
    in_proj_weight: None = None
    in_proj_bias: None = None
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> PrunableAttention:
        """The same function as ``mha`` (weights copied)."""
        reason = unconvertible_reason(mha)
        if reason:
            raise ValueError(reason)
        e = mha.embed_dim
        bias = mha.in_proj_bias is not None
        new = cls(
            e, mha.num_heads, mha.head_dim, mha.kdim, mha.vdim, bias, mha.dropout, mha.batch_first
        )
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                assert mha.in_proj_weight is not None
                wq, wk, wv = mha.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for proj, w in ((new.q_proj, wq), (new.k_proj, wk), (new.v_proj, wv)):
                proj.weight.copy_(w)
            if bias:
                assert mha.in_proj_bias is not None
                for proj, b in zip(
                    (new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.chunk(3), strict=True
                ):
                    proj.bias.copy_(b)
                new.out_proj.bias.copy_(mha.out_proj.bias)
            new.out_proj.weight.copy_(mha.out_proj.weight)
        return new.train(mha.training)

    def _mask(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        like: torch.Tensor,
    ) -> torch.Tensor | None:
        """One additive float mask broadcastable to (batch, heads, L, S); nn.MHA's bool masks mean 'ignore'."""
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() != 2:
                raise ValueError(
                    "PrunableAttention takes a 2-D attn_mask (L, S); per-head masks no longer match pruned heads"
                )
            mask = _additive(attn_mask, like)[None, None]
        if key_padding_mask is not None:
            kpm = _additive(key_padding_mask, like)[:, None, None, :]
            mask = kpm if mask is None else mask + kpm
        return mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, lq, lk = query.shape[0], query.shape[1], key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, lq, h, d).transpose(1, 2)
        k = self.k_proj(key).view(n, lk, h, d).transpose(1, 2)
        v = self.v_proj(value).view(n, lk, h, d).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, q)
        causal = is_causal and mask is None
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * d**-0.5
            if causal:
                scores = scores.masked_fill(
                    torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1), float("-inf")
                )
            if mask is not None:
                scores = scores + mask
            attn = F.dropout(scores.softmax(-1), p, self.training)
            out = attn @ v
            weights = attn.mean(1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal
            )
        out = self.out_proj(out.transpose(1, 2).reshape(n, lq, h * d))
        if not batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"


def _additive(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(like.dtype)


def unconvertible_reason(mha: nn.MultiheadAttention) -> str | None:
    """Why ``mha`` cannot become a :class:`PrunableAttention`, or None."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "it has add_bias_kv=True (learned key/value biases appended to the sequence)"
    if mha.add_zero_attn:
        return "it has add_zero_attn=True"
    return None


def convert_attention_(model: nn.Module, skip: Sequence[nn.Module] = ()) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (except ``skip``) in place.

    Returns:
        The names of the replaced modules.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention) and module not in skip:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, PrunableAttention.from_mha(module))
            replaced.append(name)
    return replaced


def head_importance(attn: PrunableAttention, p: int = 2, taylor: bool = False) -> torch.Tensor:
    """One score per head: the norm of its q/k/v rows and output-projection columns."""
    h, d = attn.num_heads, attn.head_dim
    score = torch.zeros(h)
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            for name, v in weight_scores(proj.named_parameters(), p, taylor):
                if proj is attn.out_proj:
                    if name == "weight":
                        score += v.sum(0).view(h, d).sum(1)
                else:
                    score += v.reshape(h, d, -1).sum(dim=(1, 2))
    return score


def prune_heads_(attn: PrunableAttention, keep: Sequence[int]) -> None:
    """Keep only the heads ``keep`` (indices into the current heads)."""
    d = attn.head_dim
    rows = torch.tensor([hd * d + i for hd in sorted(keep) for i in range(d)], dtype=torch.long)
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        proj.weight = nn.Parameter(proj.weight.data.index_select(0, rows).contiguous())
        if proj.bias is not None:
            proj.bias = nn.Parameter(proj.bias.data.index_select(0, rows).contiguous())
        proj.out_features = len(rows)
    attn.out_proj.weight = nn.Parameter(
        attn.out_proj.weight.data.index_select(1, rows).contiguous()
    )
    attn.out_proj.in_features = len(rows)
    attn.num_heads = len(keep)


# --------------------------------------------------------------------------- head adapters
# An attention layer is, for head pruning, four projections and a head width: removing head h
# drops rows [h*d, (h+1)*d) of q, k and v and the same columns of the output projection. An
# adapter recognises one family of attention modules and says where those projections are.


@dataclass
class AttentionHeads:
    """One attention layer seen as ``(q, k, v, out, head_dim)``.

    Attributes:
        name: the module path of the layer (for reports and the structure file).
        q / k / v / out: the projections (``nn.Linear``).
        head_dim: the width of one head.
        owner: the module that records the head count; ``counts`` are its attributes holding
            the number of heads and ``widths`` those holding ``heads * head_dim``.
    """

    name: str
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    out: nn.Linear
    head_dim: int
    owner: nn.Module
    counts: tuple[str, ...] = ("num_heads",)
    widths: tuple[str, ...] = ()

    @property
    def num_heads(self) -> int:
        return self.q.out_features // self.head_dim

    def importance(self, p: int = 2) -> torch.Tensor:
        """One score per head: the ``p``-norm mass of its q/k/v rows (with biases) and of its
        output-projection columns."""
        h, d = self.num_heads, self.head_dim
        score = torch.zeros(h)
        with torch.no_grad():
            for lin in (self.q, self.k, self.v):
                score += lin.weight.abs().pow(p).reshape(h, d, -1).sum((1, 2))
                if lin.bias is not None:
                    score += lin.bias.abs().pow(p).reshape(h, d).sum(1)
            score += self.out.weight.abs().pow(p).sum(0).reshape(h, d).sum(1)
        return score

    def prune_(self, keep: Sequence[int]) -> None:
        """Keep only the heads ``keep`` (indices into the current heads)."""
        d = self.head_dim
        rows = torch.tensor([hd * d + i for hd in sorted(keep) for i in range(d)], dtype=torch.long)
        for proj in (self.q, self.k, self.v):
            proj.weight = nn.Parameter(proj.weight.data.index_select(0, rows).contiguous())
            if proj.bias is not None:
                proj.bias = nn.Parameter(proj.bias.data.index_select(0, rows).contiguous())
            proj.out_features = len(rows)
        self.out.weight = nn.Parameter(self.out.weight.data.index_select(1, rows).contiguous())
        self.out.in_features = len(rows)
        for attr in self.counts:
            setattr(self.owner, attr, len(keep))
        for attr in self.widths:
            setattr(self.owner, attr, len(rows))


def _prunable(name: str, module: nn.Module, model: nn.Module) -> AttentionHeads | None:
    if not isinstance(module, PrunableAttention):
        return None
    return AttentionHeads(
        name, module.q_proj, module.k_proj, module.v_proj, module.out_proj, module.head_dim, module
    )


def _bert_style(name: str, module: nn.Module, model: nn.Module) -> AttentionHeads | None:
    """Hugging Face BERT-family attention (BERT, RoBERTa, MiniLM, ELECTRA, ViT): a module with
    ``self`` (``query``/``key``/``value``, ``attention_head_size``) and ``output.dense``. Its
    forward reshapes with ``-1`` heads (transformers 5), so removing rows is all it takes."""
    inner = getattr(module, "self", None)
    dense = getattr(getattr(module, "output", None), "dense", None)
    lins = [getattr(inner, a, None) for a in ("query", "key", "value")]
    d = getattr(inner, "attention_head_size", None)
    if not (isinstance(dense, nn.Linear) and all(isinstance(x, nn.Linear) for x in lins) and d):
        return None
    q, k, v = lins
    assert isinstance(inner, nn.Module) and isinstance(q, nn.Linear)
    assert isinstance(k, nn.Linear) and isinstance(v, nn.Linear)
    return AttentionHeads(
        name, q, k, v, dense, int(d), inner, ("num_attention_heads",), ("all_head_size",)
    )


# adapters tried in order on every module; a third party appends its own
HEAD_ADAPTERS: dict[str, Callable[[str, nn.Module, nn.Module], AttentionHeads | None]] = {
    "edgesmith": _prunable,
    "hf-bert": _bert_style,
}


def attention_heads(model: nn.Module) -> dict[str, AttentionHeads]:
    """Every attention layer of ``model`` an adapter recognises, by module path."""
    found: dict[str, AttentionHeads] = {}
    for name, module in model.named_modules():
        for adapter in HEAD_ADAPTERS.values():
            heads = adapter(name, module, model)
            if heads is not None:
                found[name] = heads
                break
    return found


def prune_attention_heads_(model: nn.Module, ratio: float, p: int = 2) -> dict[str, list[int]]:
    """Remove the ``ratio`` least important heads of every attention layer (at least one head
    stays); returns the kept head indices per layer."""
    kept = {}
    for name, heads in attention_heads(model).items():
        h = heads.num_heads
        n = max(1, round(h * (1 - ratio)))
        keep = sorted(heads.importance(p).argsort(descending=True)[:n].tolist())
        heads.prune_(keep)
        kept[name] = keep
    return kept
