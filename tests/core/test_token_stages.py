"""The small token model of test_token_build.py (int64 ids + mask, embedding + logits) through
the training stages: structured pruning (attention heads of an ``nn.TransformerEncoderLayer``),
feature-loss distillation and quantization-aware training, then bundles (ONNX; OpenVINO and
TFLite in the slow test) judged by output kind that run at any sequence length (random weights
and tokens: mechanics, not accuracy; the metric is the cosine to the unpruned model's
embeddings)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.core.test_token_build import RECIPE, _build, _tokens

PRUNE_DISTILL = """\
stages:
  - prune: {sparsity: 0.3, round_to: 8, max_accuracy_drop: 0.2}
  - distill: {epochs: 1, batch_size: 8, max_accuracy_drop: 0.2}
"""
QAT = "  - qat: {steps: 10, batch_size: 8, max_accuracy_drop: 0.1, min_calibration_samples: 8}\n"


def _build_stages(
    folder: Path, stages: str, export: str = "export: [onnx]"
) -> tuple[dict[str, Any], Path]:
    recipe = RECIPE[: RECIPE.index("stages:")] + stages + export + "\n"
    assert RECIPE.endswith("export: [onnx]\n")  # nothing after the stages but the formats
    out = _build(folder, recipe)
    return json.loads((out / "report.json").read_text()), out


def _check_prune_and_distill(prune: dict[str, Any], distill: dict[str, Any]) -> None:
    # prune: a head of the encoder layer's attention went (nn.TransformerEncoderLayer reads
    # in_proj_bias of its attention module: an internal error before), MACs really fell
    assert prune["name"] == "prune" and prune["layers"]["block.self_attn"] == [2, 1]
    assert prune["macs_reduction"] >= 0.3 and prune["macs"] < prune["macs_before"]
    assert prune["kept_layers"] == ["head"]  # the output layer keeps its width
    assert prune["accuracy"] < 0.999  # the pruned encoder is really another function
    # distill: one epoch of the cosine feature loss towards the unpruned model
    assert distill["name"] == "distill" and distill["epochs_run"] == 1
    assert distill["history"][0]["metric"] > 0.9
    assert distill["macs"] == prune["macs"]  # the pruned student, not the teacher


def _check_bundles_run_any_length(out: Path, report: dict[str, Any]) -> None:
    """Every bundle takes the pruned model at lengths it was never traced at, and agrees with
    the fp32 bundle (unit embeddings: the dot product is the cosine). Outputs are taken in
    order: TFLite bundles name them after the converter's signature, not the recipe."""
    from edgesmith.runtime import load

    arts = {(a["format"], a["precision"]): a for a in report["artifacts"]}
    models = {key: load(out / a["bundle"], device="cpu") for key, a in arts.items()}
    for length in (3, 14):
        ids, mask = _tokens(length, length)
        feeds = {"input_ids": ids, "attention_mask": mask}
        want = models[("onnx", "fp32")].run(feeds)
        assert want["embedding"].shape == (1, 32) and want["logits"].shape == (1, 3)
        for key, model in models.items():
            embedding = next(iter(model.run(feeds).values()))
            cosine = float((want["embedding"] * embedding).sum())
            assert cosine > 0.95, (key, length, cosine)


def test_prune_then_distill_on_token_inputs(tmp_path: Path) -> None:
    report, out = _build_stages(tmp_path, PRUNE_DISTILL)
    _check_prune_and_distill(*report["stages"])
    assert [(a["format"], a["precision"]) for a in report["artifacts"]] == [("onnx", "fp32")]
    parity = report["artifacts"][0]["parity"]
    assert parity["passed"] and parity["mean_cosine"] > 0.999
    _check_bundles_run_any_length(out, report)


@pytest.mark.slow
def test_prune_distill_qat_on_token_inputs_in_every_format(tmp_path: Path) -> None:
    """About a minute here: torchao re-exports its dropout patterns at every train/eval switch
    of the QAT graph, and three formats are quantized and timed."""
    formats = ["onnx", "openvino", "tflite"]
    report, out = _build_stages(tmp_path, PRUNE_DISTILL + QAT, "export: [onnx, openvino, tflite]")
    prune, distill, qat = report["stages"]
    _check_prune_and_distill(prune, distill)
    # qat: fine-tuned through int64 inputs of any length; judged by the recipe's metric
    fq = qat["qat"]
    assert "fake_quant_top1" not in fq and fq["fake_quant_metric"] > 0.9
    assert fq["fake_quant_samples"] == 48 and fq["loss_first"] > 0
    arts = {(a["format"], a["precision"]): a for a in report["artifacts"]}
    assert set(arts) == {(f, p) for f in formats for p in ("fp32", "int8")}
    assert set(qat["quantization"]["int8_recipe"]) == set(formats)
    for fmt in formats:
        int8 = arts[(fmt, "int8")]
        parity = int8["parity"]
        assert parity["passed"] and "top1_agreement" not in parity["outputs"]["embedding"]
        assert parity["mean_cosine"] > 0.95
        assert int8["accuracy"] >= fq["accuracy_before"] - 0.1  # the qat budget held
    _check_bundles_run_any_length(out, report)
