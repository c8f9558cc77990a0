"""Pruning beyond plain CNNs: recurrent hidden units, attention heads, depthwise/inverted-residual
nets; and the clear errors for layers that cannot be pruned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgesmith.compress.pruning.attention import PrunableAttention, prune_heads_
from edgesmith.compress.pruning.recurrent import RecurrentPruner
from edgesmith.compress.pruning.structured import StructuredPruner, layer_widths
from edgesmith.errors import CompressionError
from edgesmith.measure import count_macs
from tests.compress.conftest import EXAMPLE, accuracy, trained


class _Seq(nn.Module):
    """A recurrent classifier over the 28 image rows (any nn.RNNBase)."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        self.fc = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x.flatten(1, 2))[0][:, -1])


@pytest.mark.parametrize(
    "rnn",
    [
        lambda: nn.LSTM(28, 24, batch_first=True),
        lambda: nn.GRU(28, 24, num_layers=2, batch_first=True),
        lambda: nn.LSTM(28, 24, num_layers=2, bidirectional=True, batch_first=True),
        lambda: nn.RNN(28, 24, batch_first=True),
    ],
    ids=["lstm", "gru-2layer", "lstm-bidirectional-2layer", "rnn"],
)
def test_removing_dead_hidden_units_keeps_the_function_exactly(rnn) -> None:
    """Units whose gate rows are all zero never activate; removing them must change nothing.

    A slicing mistake in any gate block, layer or direction shows up as a different output.
    """
    torch.manual_seed(0)
    model = _Seq(rnn()).eval()
    dead = [1, 5, 6, 17]
    layer = model.rnn
    hidden = layer.hidden_size
    with torch.no_grad():
        for p in layer.parameters():  # rows of every gate block; tanh(0) = 0 for a plain RNN
            p.view(-1, hidden, *p.shape[1:])[:, dead] = 0
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    pruner = RecurrentPruner()
    dirs = 2 if layer.bidirectional else 1
    pruner.prune_out_channels(layer, [d + k * hidden for k in range(dirs) for d in dead])
    keep = torch.tensor([i for i in range(dirs * hidden) if i % hidden not in dead])
    model.fc.weight = nn.Parameter(model.fc.weight.data[:, keep])
    model.fc.in_features = len(keep)
    assert layer.hidden_size == hidden - len(dead)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_trained_lstm_loses_hidden_units_and_still_classifies(fmnist) -> None:
    model = trained("RowLSTM")
    acc0 = accuracy(model, fmnist.eval)
    pruner = StructuredPruner(model, EXAMPLE, importance="l2", round_to=8)
    macs = pruner.prune_to_macs(pruner.base_macs // 2)
    assert pruner.base_macs > 2_000_000  # the LSTM's own MACs are counted, not just the Linear
    assert macs <= pruner.base_macs // 2
    assert model.lstm.hidden_size % 8 == 0 and model.lstm.hidden_size < 128
    assert model.fc.in_features == model.lstm.hidden_size
    acc = accuracy(model, fmnist.eval)
    assert acc0 > 0.85 and acc > 0.5


def test_attention_conversion_is_exact_and_heads_can_go() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    conv = PrunableAttention.from_mha(mha).eval()
    x = torch.randn(2, 9, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    with torch.no_grad():
        for kwargs in ({}, {"need_weights": False}, {"key_padding_mask": pad}):
            ref, w_ref = mha(x, x, x, **kwargs)
            out, w = conv(x, x, x, **kwargs)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
            if w_ref is not None:
                torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
        # a head whose output projection is zero contributes nothing: removing it is exact
        conv.out_proj.weight[:, 8:16] = 0
        ref, _ = conv(x, x, x, need_weights=False)
        prune_heads_(conv, [0, 2, 3])
        out, _ = conv(x, x, x, need_weights=False)
    assert conv.num_heads == 3 and conv.q_proj.out_features == 24
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_torch_encoder_layers_run_converted_attention_in_eval_mode() -> None:
    """nn.TransformerEncoder(Layer) pick their fused fast path in eval mode by reading their
    attention's in_proj_bias: a converted layer must say it has none, not raise."""
    from edgesmith.compress.pruning.attention import convert_attention_

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 9, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    with torch.no_grad():
        ref = model(x, src_key_padding_mask=pad)  # the fused fast path
        assert convert_attention_(model) == ["layers.0.self_attn", "layers.1.self_attn"]
        out = model(x, src_key_padding_mask=pad)
        torch.testing.assert_close(out[~pad], ref[~pad], rtol=1e-4, atol=1e-5)
        prune_heads_(model.layers[0].self_attn, [1, 3])
        assert model(x, src_key_padding_mask=pad).shape == (2, 9, 32)


def test_an_output_of_plain_tensor_ops_is_never_taken_for_a_layer() -> None:
    """An embedding normalised after its last layer is no layer's output. Outputs were matched
    to layers by id(): a freed intermediate's id, reused by the output, named a hidden layer
    (in about 2 of 5 calls here), which the pruner then kept at full width."""
    from edgesmith.compress.pruning.structured import find_output_layers

    class Embedder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            e = torch.relu(self.b(torch.relu(self.a(x))))
            e = e / e.norm(dim=1, keepdim=True)
            return e * 1.0, self.head(e)

    model = Embedder()
    found = [find_output_layers(model, (torch.randn(2, 8),)) for _ in range(30)]
    assert all(names == ["head"] for names in found), found


def test_trained_transformer_loses_heads_and_mlp_width(fmnist, tmp_path: Path) -> None:
    from edgesmith.export.onnx import export
    from edgesmith.runtime import load

    model = trained("PatchTransformer")
    pruner = StructuredPruner(model, EXAMPLE, importance="l2", round_to=8)
    macs = pruner.prune_to_macs(pruner.base_macs // 2)
    assert macs <= pruner.base_macs // 2
    assert pruner.base_macs > 3_500_000  # attention (SDPA) MACs are counted too
    widths = layer_widths(model)
    for b in ("blocks.0", "blocks.1"):
        assert isinstance(model.get_submodule(f"{b}.attn"), PrunableAttention)
        assert widths[f"{b}.attn"] < 4  # heads removed
        assert widths[f"{b}.mlp.0"] < 128 and widths[f"{b}.mlp.0"] % 8 == 0  # MLP width
    assert model.patch.out_channels == 64 and model.head.in_features == 64  # embedding width kept
    assert accuracy(model, fmnist.eval) > 0.4
    # the pruned transformer exports and runs in ONNX Runtime with the same outputs
    path = export(model, (EXAMPLE,), tmp_path / "t.onnx")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x).numpy()
    session = load(path, device="cpu")
    outs = [session(x[i : i + 1].numpy()) for i in range(4)]
    np.testing.assert_allclose(np.concatenate(outs), ref, atol=1e-4)


class _ProjLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(28, 32)
        self.rnn = nn.LSTM(32, 32, proj_size=16, batch_first=True)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(self.pre(x.flatten(1, 2)))[0][:, -1])


def test_lstm_with_projection_is_named_as_unprunable() -> None:
    with pytest.raises(
        CompressionError, match=r"layer 'rnn' \(LSTM\) cannot be pruned: .*proj_size"
    ) as e:
        StructuredPruner(_ProjLSTM(), EXAMPLE)
    assert "ignore: ['rnn']" in (e.value.hint or "")
    # once ignored, the layers around it are pruned and the LSTM keeps its hidden size
    model = _ProjLSTM().eval()
    pruner = StructuredPruner(model, EXAMPLE, ignore=["rnn"], round_to=None)
    pruner.prune_to_macs(int(pruner.base_macs * 0.9))
    assert model.rnn.hidden_size == 32 and model.rnn.proj_size == 16
    assert model.pre.out_features < 32 and model.rnn.input_size == model.pre.out_features
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_attention_with_bias_kv_is_named_as_unprunable() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(28, 32)
            self.attn = nn.MultiheadAttention(32, 4, add_bias_kv=True, batch_first=True)
            self.head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.proj(x.flatten(1, 2))
            return self.head(self.attn(h, h, h)[0][:, 0])

    with pytest.raises(
        CompressionError,
        match=r"layer 'attn' \(MultiheadAttention\) cannot be pruned: .*add_bias_kv",
    ):
        StructuredPruner(M(), EXAMPLE)
    model = M().eval()
    pruner = StructuredPruner(model, EXAMPLE, ignore=["attn"])
    pruner.prune_to_macs(pruner.base_macs - 1000)  # the attention itself holds most MACs
    assert isinstance(model.attn, nn.MultiheadAttention)  # left as it was ...
    assert model.attn.embed_dim == 32 and model.proj.out_features == 32  # ... with its inputs
    assert model.head[0].out_features < 64  # the rest is pruned
    assert model(EXAMPLE).shape == (1, 10)


@pytest.mark.slow
def test_efficientnet_lite0_depthwise_inverted_residual_pruning() -> None:
    """Pretrained EfficientNet-Lite0 (depthwise convs, residual adds): 30% of MACs removed."""
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location(
        "effnet", ROOT / "examples" / "efficientnet_lite0" / "model.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.EfficientNetLite0FMNIST().eval()
    base = count_macs(model, EXAMPLE)
    assert base > 90_000_000  # F.conv2d of the same-padding subclass is counted
    pruner = StructuredPruner(model, EXAMPLE, importance="l2", round_to=8)
    macs = pruner.prune_to_macs(int(base * 0.7))
    assert macs <= 0.7 * base
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels  # depthwise stays depthwise
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
