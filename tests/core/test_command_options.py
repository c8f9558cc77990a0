"""The stage commands' options are made from the stage config models: same types, same bounds."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from edgesmith.commands.distill import distill_cmd
from edgesmith.commands.options import click_type
from edgesmith.commands.prune import prune_cmd
from edgesmith.commands.quantize import quantize_cmd
from edgesmith.compress.distill import DistillConfig
from edgesmith.compress.prune import PruneConfig
from edgesmith.compress.quantize.config import QuantizeConfig

pytestmark = pytest.mark.timeout(60)  # no model, no data: seconds at most

COMMANDS = [(prune_cmd, PruneConfig), (distill_cmd, DistillConfig), (quantize_cmd, QuantizeConfig)]
# options that set a field but take another form on the command line
OWN_FORM = {
    "round_to",  # auto | 0 | N (the recipe writes auto | null | N)
    "student",  # a weights file or a factory, plus --student-weights / --student-kwargs
    "teacher",
    "checkpoint_dir",  # a click.Path
}


def _describe(t: click.ParamType) -> tuple[object, ...]:
    if isinstance(t, click.Choice):
        return ("choice", tuple(t.choices))
    if isinstance(t, click.IntRange | click.FloatRange):
        return (type(t).__name__, t.min, t.max, t.min_open, t.max_open)
    return (type(t).__name__,)


@pytest.mark.parametrize(("cmd", "model"), COMMANDS, ids=lambda x: getattr(x, "name", ""))
def test_every_stage_option_has_its_fields_type_and_bounds(cmd, model) -> None:  # type: ignore[no-untyped-def]
    checked = []
    for param in cmd.params:
        if param.name not in model.model_fields or param.name in OWN_FORM:
            continue
        expected, multiple = click_type(model, param.name)
        if expected is click.BOOL:
            assert isinstance(param, click.Option) and param.is_flag, param.name
        else:
            assert _describe(param.type) == _describe(expected), param.name
        assert param.multiple == multiple, param.name
        checked.append(param.name)
    assert len(checked) >= 4  # the commands do set stage options from flags


def test_bounds_come_from_the_config_models() -> None:
    steps = next(p for p in prune_cmd.params if p.name == "steps")
    assert _describe(steps.type) == ("IntRange", 1, 100, False, False)  # PruneConfig.steps
    alpha = next(p for p in distill_cmd.params if p.name == "alpha")
    assert _describe(alpha.type) == ("FloatRange", 0, 1, False, False)
    temperature = next(p for p in distill_cmd.params if p.name == "temperature")
    assert _describe(temperature.type) == ("FloatRange", 0, None, True, False)
    method = next(p for p in quantize_cmd.params if p.name == "calibration_method")
    assert list(method.type.choices) == ["minmax", "percentile", "entropy", "mse"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune", "r.yaml", "-o", "p.safetensors", "--steps", "101"], "1<=x<=100"),
        (["distill", "r.yaml", "-o", "d.safetensors", "--alpha", "1.5"], "0<=x<=1"),
        (["quantize", "r.yaml", "-o", "q", "--calibration-method", "best"], "'best' is not one of"),
    ],
)
def test_out_of_bounds_flags_are_refused_before_any_work(args: list[str], message: str) -> None:
    from edgesmith.cli import cli

    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and message in res.output


def test_a_field_without_a_plain_form_is_refused() -> None:
    with pytest.raises(TypeError, match="round_to"):
        click_type(PruneConfig, "round_to")
