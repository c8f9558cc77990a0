"""Typed checks: the budget rule, the hint choice, and how the build reads a stage's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgesmith.checks import (
    BUDGET_HINT,
    PARITY_HINT,
    Check,
    accuracy_budget,
    failed,
    failure_hint,
)
from edgesmith.compress import STAGES, Stage, StageConfig, StageResult
from edgesmith.errors import CheckFailed, EdgesmithError
from edgesmith.pipeline import build
from edgesmith.recipe import load_recipe
from tests.conftest import BASE_RECIPE, write_recipe


def test_accuracy_budget_is_the_drop_from_the_reference() -> None:
    ok = accuracy_budget("prune", 0.93, 0.925, 0.005)  # exactly the budget: float noise forgiven
    assert ok.passed and ok.key == "max_accuracy_drop" and ok.measured == 0.005
    bad = accuracy_budget("distill", 0.93, 0.92, 0.005)
    assert not bad.passed and (bad.limit, bad.measured, bad.hint) == (0.005, 0.01, BUDGET_HINT)
    assert (
        str(bad)
        == bad.detail
        == ("distill: accuracy fell 0.0100 (0.9300 -> 0.9200), more than max_accuracy_drop 0.005")
    )
    assert accuracy_budget("prune", 0.9, 0.95, 0.0).passed  # a gain is no drop


def test_a_failed_budget_names_the_fix_before_parity() -> None:
    parity = Check("export", "parity", None, None, False, PARITY_HINT, "m.onnx: parity failed")
    budget = accuracy_budget("quantize", 0.9, 0.8, 0.01)
    assert failure_hint([parity, budget]) == BUDGET_HINT  # whatever the order
    assert failure_hint([parity]) == PARITY_HINT
    assert failure_hint([accuracy_budget("prune", 0.9, 0.9, 0.0)]) == ""
    assert failed([parity, accuracy_budget("prune", 0.9, 0.9, 0.0)]) == [parity]


class _Strict(Stage):
    """A stage whose check always fails: the build must stop on the check, not on a sentence."""

    name = "strict-test"
    config_cls = StageConfig

    def run(self, ctx):  # type: ignore[no-untyped-def]
        check = Check(self.name, "widgets", 1.0, 2.0, False, "use fewer widgets", "2 widgets > 1")
        return StageResult({"widgets": 2}, [check])


class _Legacy(Stage):
    """The protocol before typed results: run(ctx) -> ctx."""

    name = "legacy-test"
    config_cls = StageConfig

    def run(self, ctx):  # type: ignore[no-untyped-def]
        return ctx


@pytest.fixture
def stage_recipe(recipe_dir: Path):  # type: ignore[no-untyped-def]
    def make(stage: str, extra: str = "") -> Path:
        text = BASE_RECIPE + f"stages: [{stage}]\n" + extra
        return write_recipe(recipe_dir, text, f"{stage}.yaml")

    STAGES.update({"strict-test": _Strict, "legacy-test": _Legacy})
    yield make
    del STAGES["strict-test"], STAGES["legacy-test"]


def test_failed_checks_exit_1_list_in_order_and_leave_nothing(stage_recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A stage's own check and a parity check fail; the build stops on the checks, not on text."""
    strict_parity = "parity:\n  fp32: {top1_agreement: 1.0, max_abs_diff: 1.0e-12}\n"
    recipe = load_recipe(stage_recipe("strict-test", strict_parity))
    parent = tmp_path / "builds"
    parent.mkdir()
    out = parent / "out"
    reports: list[dict] = []
    with pytest.raises(CheckFailed) as e:
        build(recipe, out, on_failure=reports.append)
    assert e.value.exit_code == 1
    (report,) = reports
    stage_failure, parity_failure = report["failures"]  # the stage's, then the artifact's
    assert stage_failure == "2 widgets > 1" and report["stages"][0]["widgets"] == 2
    assert parity_failure.startswith("t-onnx-fp32.onnx: parity failed: max abs diff")
    assert e.value.message == f"2 check(s) failed: {stage_failure}; {parity_failure}"
    assert e.value.hint == "nothing was written; use fewer widgets"  # the first failed check's
    assert json.dumps(report) and not out.exists()
    assert list(parent.iterdir()) == []  # no temp folder left behind either


def test_a_stage_that_returns_the_context_is_refused_clearly(stage_recipe) -> None:  # type: ignore[no-untyped-def]
    from edgesmith.compress import Context
    from edgesmith.pipeline import _run_stage  # what build() and the torchrun workers call

    ctx = Context.__new__(Context)  # the legacy stage only hands it back
    with pytest.raises(EdgesmithError, match="returned Context, not a StageResult") as e:
        _run_stage("legacy-test", StageConfig(), ctx)
    assert "StageResult(row, checks)" in (e.value.hint or "")
