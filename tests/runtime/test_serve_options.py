"""`edgesmith serve`'s options are made from ServeConfig: same types, bounds and defaults."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from edgesmith.cli import cli
from edgesmith.options import click_type
from edgesmith.runtime.cli import serve_cmd
from edgesmith.runtime.serve.server import ServeConfig

pytestmark = pytest.mark.timeout(60)  # no model is loaded: click refuses first

SCALE = {"max_body_bytes": 1 << 20}  # --max-body-mb


def describe(t: click.ParamType) -> tuple[object, ...]:
    if isinstance(t, click.Choice):
        return ("choice", tuple(t.choices))
    if isinstance(t, click.IntRange | click.FloatRange):
        return (type(t).__name__, t.min, t.max, t.min_open, t.max_open)
    return (type(t).__name__,)


def test_every_serve_option_has_its_fields_type_bounds_and_default() -> None:
    checked = []
    for param in serve_cmd.params:
        if param.name not in ServeConfig.model_fields:
            continue
        field = ServeConfig.model_fields[param.name]
        scale = SCALE.get(param.name, 1)
        expected, _ = click_type(ServeConfig, param.name, scale)
        if expected is click.BOOL:
            assert isinstance(param, click.Option) and param.is_flag, param.name
        else:
            assert describe(param.type) == describe(expected), param.name
            default = (
                field.default if scale == 1 or field.default is None else field.default / scale
            )
            assert param.default == default or (default is None and not param.show_default), (
                param.name
            )
        checked.append(param.name)
    assert {"max_body_bytes", "watch_interval_s", "drain_timeout_s", "port"} <= set(checked)
    assert len(checked) >= 15


def test_what_the_flags_accept_the_config_accepts() -> None:
    # the two bounds that disagreed: --max-body-mb took >= 0.01 (the model 1 KiB), --watch-interval
    # took >= 0.05 (the model > 0)
    body = next(p for p in serve_cmd.params if p.name == "max_body_bytes")
    assert describe(body.type) == ("FloatRange", 1024 / (1 << 20), None, False, False)
    assert ServeConfig(max_body_bytes=int(body.type.min * (1 << 20))).max_body_bytes == 1024
    assert body.type.convert("0.5", body, None) == 0.5  # type: ignore[union-attr]
    watch = next(p for p in serve_cmd.params if p.name == "watch_interval_s")
    assert describe(watch.type) == ("FloatRange", 0, None, True, False)
    res = CliRunner().invoke(cli, ["serve", "nowhere", "--watch-interval", "0"])
    assert res.exit_code == 2 and "--watch-interval" in res.output
    res = CliRunner().invoke(cli, ["serve", "nowhere", "--max-body-mb", "0.0001"])
    assert res.exit_code == 2 and "--max-body-mb" in res.output


def test_the_python_api_lists_every_bad_option() -> None:
    """Server(**options) goes through the one validation layer: every problem, not the first."""
    from edgesmith.errors import EdgesmithError
    from edgesmith.runtime.serve import Server

    with pytest.raises(EdgesmithError) as exc:
        Server("no-model-is-loaded-first", max_batch=0, max_queue=-1, max_bach=4)
    message = exc.value.message
    assert message.startswith("serve options: 3 problems: "), message
    assert "'max_batch'" in message and "'max_queue'" in message
    assert "unknown key 'max_bach'" in message and "did you mean 'max_batch'?" in (
        exc.value.hint or ""
    )
