"""One accuracy contract for int8 (quantize/contract.py), the target's VNNI, and the OpenVINO options."""

from __future__ import annotations

import pytest

from edgesmith.compress.quantize.config import QuantizeConfig, has_vnni, resolve_scheme
from edgesmith.compress.quantize.contract import guard_agreement, int8_contract
from edgesmith.schema import ParityTolerance, Recipe


def _parity(**int8: object) -> dict[str, ParityTolerance]:
    recipe = Recipe.model_validate(
        {
            "name": "c",
            "model": {"factory": "m:f", "input": {"shape": [1, 4]}},
            "data": {"kind": "fashion-mnist"},
            **({"parity": {"int8": int8}} if int8 else {}),
        }
    )
    return recipe.parity


def test_the_budget_is_the_gate_and_the_tolerance_only_a_guard() -> None:
    c = int8_contract(_parity(), 0.005)
    assert c.source == "budget" and c.gate == "max_accuracy_drop"
    assert c.tolerance.top1_agreement == guard_agreement(0.005) == 0.75
    assert c.tolerance.max_abs_diff is None
    text = c.describe()
    assert "follows from max_accuracy_drop 0.005" in text and "broken" in text
    assert "set parity.int8" in text  # how to choose another


def test_a_tolerance_the_user_sets_applies_and_is_named() -> None:
    c = int8_contract(_parity(top1_agreement=0.99), 0.005)
    assert c.source == "recipe" and c.tolerance.top1_agreement == 0.99
    assert "set in the recipe (parity.int8: top-1 agreement >= 0.99)" in c.describe()


def test_without_a_budget_the_default_tolerance_is_the_gate() -> None:
    c = int8_contract(_parity(), None)
    assert c.source == "default" and c.gate == "parity" and c.tolerance.top1_agreement == 0.97
    assert "no max_accuracy_drop is set" in c.describe()
    # a recipe that writes the default out (a dumped recipe does) counts as not setting it
    assert int8_contract(_parity(top1_agreement=0.97), 0.01).source == "budget"


@pytest.mark.parametrize(("budget", "guard"), [(0.0, 0.8), (0.01, 0.7), (0.05, 0.5), (1.0, 0.5)])
def test_guard_values(budget: float, guard: float) -> None:
    assert guard_agreement(budget) == guard


@pytest.mark.parametrize(
    ("name", "vnni"),
    [("x86-cpu", False), ("intel-cpu", True), ("intel-npu", True), ("rpi5", False)],
)
def test_vnni_comes_from_the_target_profile(name: str, vnni: bool) -> None:
    from edgesmith.devices.profiles import resolve_target

    profile = resolve_target(name).model_dump()
    assert has_vnni(profile) is vnni
    assert resolve_scheme(profile, QuantizeConfig()).vnni is vnni


def test_openvino_options_follow_the_scheme() -> None:
    """Percentile ranges exist in NNCF 3.4 (QUANTILE did not); overflow fix off only with VNNI;
    NNCF's fastest preset unless asymmetric activations are asked for."""
    from nncf.quantization.advanced_parameters import OverflowFix

    from edgesmith.compress.quantize.openvino import advanced_parameters

    x86 = resolve_scheme({"isa": ["avx2"]}, QuantizeConfig(calibration_method="percentile"))
    params = advanced_parameters(x86)
    assert params.overflow_fix in (None, OverflowFix.FIRST_LAYER)
    assert params.activations_range_estimator_params.min.quantile_outlier_prob == 1e-4
    assert x86.openvino_preset == "performance"
    vnni = resolve_scheme({"isa_any": ["avx512_vnni", "avx_vnni"]}, QuantizeConfig())
    assert advanced_parameters(vnni).overflow_fix == OverflowFix.DISABLE
    asym = resolve_scheme(None, QuantizeConfig(activations="asymmetric-uint8"))
    assert asym.openvino_preset == "mixed"
