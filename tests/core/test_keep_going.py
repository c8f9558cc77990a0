"""``--keep-going``: a multi-format build keeps the formats that met their checks (partial, exit 1);
without it a build writes everything or nothing (tests/compress/test_quant_mixed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_recipe

# onnx has no bf16 variant (skipped); OpenVINO's bf16 variant (fp16-stored weights) cannot meet a
# 1e-9 bf16 tolerance: one format fails, the other passes
RECIPE = """\
version: 1
name: kg
model:
  factory: model.py:SmallCNN
  weights: weights.safetensors
  input: {shape: [1, 1, 28, 28], dtype: float32}
data: {kind: fashion-mnist, calibration: 64, eval: 100}
target: x86-cpu
stages:
  - quantize: {precisions: [bf16]}
export: [onnx, openvino]
parity:
  bf16: {top1_agreement: 1.0, max_abs_diff: 1.0e-9}
"""


def test_keep_going_writes_the_formats_that_passed(
    recipe_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgesmith.cli import main

    recipe = write_recipe(recipe_dir, RECIPE)
    out = recipe_dir / "partial"
    with pytest.raises(SystemExit) as e:
        main(["build", str(recipe), "-o", str(out), "--keep-going"])
    err = capsys.readouterr().err
    assert e.value.code == 1
    error = next(line for line in err.splitlines() if line.startswith("error:"))
    assert "partial build: openvino failed its checks" in error and "max abs diff" in error
    assert "wrote" in err and "with onnx only" in err
    report = json.loads((out / "report.json").read_text())
    assert report["partial"]["formats"] == ["onnx"]
    assert list(report["partial"]["dropped"]) == ["openvino"]
    assert [(a["format"], a["precision"]) for a in report["artifacts"]] == [("onnx", "fp32")]
    assert report["failures"]  # the failed checks are in the report
    assert (out / "kg-onnx-fp32.onnx").is_file() and (out / "bundles" / "kg-onnx-fp32").is_dir()
    assert not list(out.glob("kg-openvino-*")) and not list((out / "bundles").glob("*openvino*"))
    assert "## Partial build" in (out / "report.md").read_text()
