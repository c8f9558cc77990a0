"""Token-id models: two int64 inputs with a symbolic sequence length, two named outputs, in every
format (random weights: these tests check export mechanics, not accuracy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgesmith.export._io import DynamicDim, dynamic_dims_of
from edgesmith.feeds import InputLayout
from edgesmith.runtime import load

LAYOUTS = [
    InputLayout("input_ids", "int64", ("batch", "sequence"), 0, {1: (6, 16)}),
    InputLayout("attention_mask", "int64", ("batch", "sequence"), 0, {1: (6, 16)}),
]


class _Tokens(torch.nn.Module):
    """Masked mean of token embeddings (so padding changes nothing), and class scores."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(100, 8)  # its value name collides with the output's
        self.head = torch.nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        m = attention_mask.unsqueeze(-1).float()
        e = (self.embedding(input_ids) * m).sum(1) / m.sum(1).clamp(min=1)
        return e, self.head(e)


def _tokens(batch: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, (batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    mask[0, length // 2 :] = 0  # one padded sequence
    ids[mask == 0] = 0
    return ids, mask


def _expected(net: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in net(torch.from_numpy(ids), torch.from_numpy(mask))]


def test_dynamic_dims_of_the_recipe() -> None:
    dims = dynamic_dims_of(LAYOUTS)
    assert dims[0] == {0: DynamicDim("batch", 1, 1 << 16), 1: DynamicDim("sequence", 1, 16)}


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_names_and_a_free_sequence_length(fmt: str, tmp_path: Path) -> None:
    from edgesmith.export import EXPORTERS, get_exporter

    net = _Tokens().eval()
    ex = tuple(torch.from_numpy(a) for a in _tokens(1, 6))
    path = get_exporter(fmt)(
        net,
        ex,
        tmp_path / f"tokens{EXPORTERS[fmt].suffix}",
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding", "logits"],
        dynamic_dims=dynamic_dims_of(LAYOUTS),
    )
    model = load(path, device="cpu")
    assert [s.name for s in model.inputs] == ["input_ids", "attention_mask"]
    assert [s.name for s in model.outputs] == ["embedding", "logits"]
    assert [s.dtype for s in model.inputs] == ["int64", "int64"]
    assert all(not isinstance(d, int) for d in model.inputs[0].shape)  # batch and sequence free
    for batch, length in ((1, 3), (4, 11)):
        ids, mask = _tokens(batch, length, seed=length)
        got = model.run({"input_ids": ids, "attention_mask": mask})
        for name, want in zip(("embedding", "logits"), _expected(net, ids, mask), strict=True):
            np.testing.assert_allclose(got[name], want, atol=1e-5)


def test_tflite_at_the_longest_size_padded_by_the_runtime(tmp_path: Path) -> None:
    from edgesmith.export.evaluate import inputs_manifest
    from edgesmith.export.tflite import export

    net = _Tokens().eval()
    ex = tuple(torch.from_numpy(a) for a in _tokens(1, 16))
    model = load(export(net, ex, tmp_path / "tokens.tflite"), device="cpu")
    entries = inputs_manifest(model, LAYOUTS)
    # litert-torch narrows int64 inputs to int32: the manifest says the runtime casts them
    assert [e["dtype"] for e in entries] == ["int32", "int32"]
    assert all(e["cast_from"] == ["int64"] and e["pad"] == 0 for e in entries)
    assert entries[0]["shape"] == ["batch", 16] and entries[0]["dims"]["1"]["name"] == "sequence"
    model.declare_inputs(entries)
    ids, mask = _tokens(3, 5)
    names = [s.name for s in model.inputs]
    got = model(*([ids, mask] if "ids" in names[0] or "0" in names[0] else [mask, ids]))
    # padded with masked positions to 16 tokens: the same embedding as the 5-token input
    np.testing.assert_allclose(got[0], _expected(net, ids, mask)[0], atol=1e-5)
    # the file names its inputs its own way; the recipe's names work too (manifest "alias")
    assert {e["alias"] for e in entries} == {"input_ids", "attention_mask"}
    by_recipe = model.run({"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(next(iter(by_recipe.values())), got[0], atol=1e-6)
    long = np.ones((1, 40), np.int64)
    assert model(long, long)[0].shape == (1, 8)  # cut to the 16 the file takes
    with pytest.raises(Exception, match="outside int32"):
        model(np.full((1, 4), 1 << 40, np.int64), np.ones((1, 4), np.int64))
