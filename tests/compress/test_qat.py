"""Quantization-aware training: fake-quantized fine-tuning, then int8 for each format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgesmith.compress.qat import prepare_qat
from edgesmith.pipeline import build
from edgesmith.recipe import load_recipe
from tests.conftest import write_recipe
from tests.golden import assert_structure


def test_prepared_graph_fake_quantizes_and_trains_the_model_in_place() -> None:
    from edgesmith.models import build_model
    from tests.conftest import FMNIST_RECIPE

    model = build_model(load_recipe(FMNIST_RECIPE).model)
    prepared = prepare_qat(model, torch.zeros(1, 1, 28, 28))
    fq = [m for m in prepared.modules() if "FakeQuantize" in type(m).__name__]
    assert len(fq) >= 10  # weights and activations of every conv and linear layer
    before = model.features[0].weight.detach().clone()
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(prepared(x), y).backward()
    opt.step()
    assert not torch.equal(model.features[0].weight, before)  # the export shares the parameters


QAT_RECIPE = """\
version: 1
name: qat
model:
  factory: model.py:SmallCNN
  weights: weights.safetensors
  input: {shape: [1, 1, 28, 28], dtype: float32}
data: {kind: fashion-mnist, calibration: 64, eval: 300, train: 2000}
target: x86-cpu
stages:
  - qat: {steps: 4, batch_size: 16, eval_samples: 100, max_accuracy_drop: 0.01}
export: [onnx]
"""


def test_qat_stage_fine_tunes_then_exports_int8(recipe_dir: Path) -> None:
    report = build(load_recipe(write_recipe(recipe_dir, QAT_RECIPE)), recipe_dir / "out")
    (row,) = report["stages"]
    qat = row["qat"]
    assert row["name"] == "qat" and qat["steps"] == 4 and qat["fake_quant_samples"] == 100
    assert 0.85 <= qat["fake_quant_top1"] <= 1.0 and qat["loss_first"] > 0
    int8 = next(a for a in report["artifacts"] if a["precision"] == "int8")
    assert int8["format"] == "onnx" and int8["parity"]["passed"]
    # the budget counts from the model that entered qat
    assert int8["quantization"]["accuracy_drop"] == round(
        qat["accuracy_before"] - int8["accuracy"], 6
    )
    assert int8["quantization"]["accuracy_drop"] <= 0.01
    assert_structure("report-qat", report)  # every key of the public format, as before


@pytest.mark.slow
def test_qat_then_int8_for_every_format(recipe_dir: Path) -> None:
    text = QAT_RECIPE.replace("steps: 4", "steps: 100").replace(
        "export: [onnx]", "export: [onnx, openvino, tflite]"
    )
    report = build(load_recipe(write_recipe(recipe_dir, text)), recipe_dir / "out")
    int8 = {a["format"]: a for a in report["artifacts"] if a["precision"] == "int8"}
    assert set(int8) == {"onnx", "openvino", "tflite"}
    for a in int8.values():
        assert a["parity"]["passed"] and a["quantization"]["accuracy_drop"] <= 0.01
