"""Accuracy-aware mixed precision: the search keeps the fewest layers float, or says why it cannot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgesmith.compress.quantize.mixed import Probe, search
from edgesmith.recipe import ParityTolerance

# mixed-precision searches on real models: minutes on a loaded machine
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """SmallCNN exported to ONNX, an onnxruntime quantizer calibrated once, 2000 test images."""
    from edgesmith.compress.quantize.base import ModuleNames
    from edgesmith.compress.quantize.config import Scheme
    from edgesmith.compress.quantize.onnx import OnnxQuantizer
    from edgesmith.export.onnx import export
    from edgesmith.measure import torch_outputs
    from edgesmith.metrics import top1
    from edgesmith.pipeline import _eval_inputs, prepare
    from edgesmith.recipe import load_recipe
    from tests.conftest import FMNIST_RECIPE

    recipe = load_recipe(FMNIST_RECIPE)
    recipe.data.eval, recipe.data.calibration = 2000, 128
    p = prepare(recipe)
    work = tmp_path_factory.mktemp("mixed")
    fp32 = export(p.model, (p.example,), work / "fp32.onnx")
    calib = np.stack([p.data.calibration[i][0].numpy() for i in range(128)])
    q = OnnxQuantizer(fp32, calib, Scheme(), work / "q", ModuleNames(p.model, p.example))
    ref, targets = torch_outputs(p.model, p.data.eval)
    inputs = _eval_inputs(p.data.eval)

    def probe(agreement: float) -> Probe:
        return Probe(
            inputs,
            ref,
            targets,
            top1,
            ParityTolerance(top1_agreement=agreement, max_abs_diff=None),
            2,
        )

    return q, probe, work


def test_layers_carry_pytorch_names(setup) -> None:  # type: ignore[no-untyped-def]
    q, _, _ = setup
    # batch norms are folded into the convolutions; the report names the convolution modules
    assert [layer.name for layer in q.layers] == [
        "features.0",
        "features.3",
        "features.7",
        "features.10",
        "classifier.1",
        "classifier.4",
    ]
    assert [layer.params for layer in q.layers] == [288, 9216, 18432, 36864, 200704, 640]


def test_search_moves_towards_float_one_measured_step_at_a_time(setup) -> None:  # type: ignore[no-untyped-def]
    """Greedy on the measured joint effect: every kept step improved the model, each fallback's
    accuracy gain and latency cost are measured, and the result is 1-minimal."""
    from edgesmith.compress.quantize.speed import make_timer

    q, probe, work = setup
    strict = probe(1.0)  # int8 must give the float model's top-1 on every one of 2000 images
    all_int8 = strict(q.quantize(work / "all.onnx", [])[0])
    assert not all_int8.parity_ok  # precondition: all-int8 does not meet it
    result = search(
        q,
        strict,
        sensitivity_probe=probe(1.0),
        verify=None,
        max_accuracy_drop=0.005,
        max_float_layers=6,
        refine=True,
        work_dir=work,
        suffix=".onnx",
        timer=make_timer(1, strict.inputs[:1], rounds=3, runs=5),
    )
    assert result.accepted and result.measurement.agreement == 1.0
    assert 1 <= len(result.float_layers) < len(q.layers)
    assert [f.id for f in result.fallbacks] == result.float_layers
    assert all(f.latency_ms is not None for f in result.fallbacks)
    # each kept step improved the model: the metric, or at equal metric the agreement
    assert all(
        f.accuracy_gain > 0 or (f.accuracy_gain == 0 and f.agreement_gain > 0)
        for f in result.fallbacks
    )
    assert result.first is not None and result.measurement.agreement > result.first.agreement
    gains = [g for _, g in result.sensitivity]
    assert gains == sorted(gains, reverse=True) and len(gains) == len(q.layers)
    # 1-minimal: quantizing any kept layer too breaks the requirement again
    for lid in result.float_layers:
        rest = [x for x in result.float_layers if x != lid]
        assert not strict(q.quantize(work / "rest.onnx", rest)[0]).parity_ok
    assert not list(work.glob("candidate-*"))  # candidates are cleaned up


def test_probe_stops_once_a_candidate_cannot_win(setup) -> None:  # type: ignore[no-untyped-def]
    q, probe, work = setup
    p = probe(0.0)
    path = q.quantize(work / "all.onnx", [])[0]
    full = p(path)
    stopped = p(path, floor=1.01, by_agreement=True)  # nothing reaches 101% agreement
    assert full.complete and full.samples == len(p)
    assert not stopped.complete and stopped.samples < len(p)
    again = p(path, floor=full.agreement - 0.01, by_agreement=True)  # reachable: runs to the end
    assert again.complete and again.agreement == full.agreement


def test_unmeetable_budget_reports_the_best_and_why(setup) -> None:  # type: ignore[no-untyped-def]
    q, probe, work = setup
    result = search(
        q,
        probe(1.0),
        sensitivity_probe=probe(1.0),
        verify=None,
        max_accuracy_drop=0.0,
        max_float_layers=0,
        work_dir=work,
        suffix=".onnx",
    )
    assert not result.accepted and result.float_layers == []
    assert "max_float_layers=0" in result.reason
    assert "int8 parity: top-1 agreement" in result.reason and "< 1.0" in result.reason
    assert result.trials[0]["step"] == "all int8"


BUDGET_MISS = """\
version: 1
name: miss
model:
  factory: model.py:SmallCNN
  weights: weights.safetensors
  input: {shape: [1, 1, 28, 28], dtype: float32}
data: {kind: fashion-mnist, calibration: 64, eval: 300}
target: x86-cpu
stages:
  - quantize: {max_float_layers: 0}
export: [onnx]
parity:
  int8: {top1_agreement: 0.9, max_abs_diff: 1.0e-6}
"""


def test_budget_miss_exits_1_with_the_best_result(
    recipe_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgesmith.cli import main
    from tests.conftest import write_recipe

    recipe = write_recipe(recipe_dir, BUDGET_MISS)
    out = recipe_dir / "out"
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(recipe), "-o", str(out), "--max-accuracy-drop", "0.0"])
    captured = capsys.readouterr()
    err = captured.err
    assert e.value.code == 1
    error = next(line for line in err.splitlines() if line.startswith("error:"))
    assert "miss-onnx-int8.onnx" in error and "max_float_layers=0" in error
    assert "int8 parity: max abs diff" in error and "> 1e-06" in error
    # the summary with the best result is printed although nothing is written
    assert "| `miss-onnx-int8.onnx` | onnx | int8 |" in err + captured.out
    assert not out.exists() and not any(p.name.startswith(".out") for p in recipe_dir.iterdir())


def test_best_candidate_is_judged_on_the_whole_evaluation_set(setup) -> None:  # type: ignore[no-untyped-def]
    """No candidate holds on the search samples, but the best one holds where the budget is defined."""
    q, probe, work = setup
    strict, loose = probe(1.0), probe(0.9)  # int8 never agrees on 100% of the samples
    result = search(
        q,
        strict,
        sensitivity_probe=strict,
        verify=loose,
        max_accuracy_drop=None,
        max_float_layers=1,
        work_dir=work,
        suffix=".onnx",
    )
    assert result.accepted and not result.reason
    assert result.trials[-1]["step"] == "best candidate (whole evaluation set)"
    assert result.measurement.agreement >= 0.9


def test_require_speedup_refuses_an_int8_model_that_is_not_faster(setup) -> None:  # type: ignore[no-untyped-def]
    """The verdict times the int8 file against its backend's fp32 file, interleaved; an "int8"
    model ~50x the work of the fp32 one (three wide float layers) is reported not faster, with the
    float artifact recommended, and ``require_speedup`` turns that into a failed check."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from edgesmith.compress.quantize.hook import _speed
    from edgesmith.export.onnx import export

    _, probe, work = setup
    wide = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 4096), nn.Linear(4096, 4096), nn.Linear(4096, 10)
    ).eval()
    slow = export(wide, (torch.zeros(1, 1, 28, 28),), work / "slow.onnx")
    ev = SimpleNamespace(threads=1, inputs=probe(0.0).inputs[:1])
    art = SimpleNamespace(path=slow, format="onnx")
    fp32 = SimpleNamespace(path=work / "fp32.onnx")

    verdict, checks = _speed(art, fp32, ev, False, "quantize")  # type: ignore[arg-type]
    assert verdict["baseline"] == "fp32" and verdict["ratio"] > 1 and not verdict["faster"]
    assert "ship the fp32 artifact" in verdict["recommendation"] and not checks
    verdict, checks = _speed(art, fp32, ev, True, "quantize")  # type: ignore[arg-type]
    (check,) = checks
    assert not check.passed and check.key == "require_speedup"
    assert "require_speedup: int8 is not faster than fp32 with onnx" in check.detail


@pytest.mark.parametrize(
    "value", ["['a', 'b', 'conv']", "[" * 5000 + "]" * 5000, "12", "['x', 3, None, 'y']", "oops("]
)
def test_module_names_from_hostile_exporter_metadata(value: str) -> None:
    """The exporter's name scopes are text in the model file: anything that is not a list of
    names gives no module name, never an exception."""
    import onnx

    from edgesmith.compress.quantize.onnx import _module_of

    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=value)
    got = _module_of(node)
    assert got == {"['a', 'b', 'conv']": "b", "['x', 3, None, 'y']": "x"}.get(value), got
