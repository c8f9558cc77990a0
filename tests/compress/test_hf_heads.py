"""Attention-head pruning of Hugging Face BERT-style encoders (MiniLM's family): removing a head
is exactly zeroing its contribution (a small random BertModel; the check is equivalence)."""

from __future__ import annotations

import torch

from edgesmith.compress.pruning.attention import attention_heads, prune_attention_heads_


def _bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=False).eval()


def test_pruned_heads_equal_zeroed_heads() -> None:
    model = _bert()
    heads = attention_heads(model)
    assert len(heads) == 2 and all(h.num_heads == 4 and h.head_dim == 8 for h in heads.values())
    reference = _bert()
    kept = prune_attention_heads_(model, 0.5)
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    # the same model with the removed heads' value rows and output columns zeroed
    with torch.no_grad():
        for name, h in attention_heads(reference).items():
            for gone in sorted(set(range(4)) - set(kept[name])):
                rows = slice(gone * 8, (gone + 1) * 8)
                h.v.weight[rows] = 0
                h.v.bias[rows] = 0
                h.out.weight[:, rows] = 0
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert all(len(k) == 2 for k in kept.values())
    assert all(h.num_heads == 2 for h in attention_heads(model).values())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
