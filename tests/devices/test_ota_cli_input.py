"""Bad input to the OTA commands: one `error:` line and exit 2 (usage) or 1 (a refused update),
never an internal error (exit 70); strings from bundles and channels never reach a terminal raw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ota_helpers import Bundles

from edgesmith.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--rollout", "120%", "rollout must be a percentage"),
        ("--rollout", "nan", "rollout must be a percentage"),
        ("--expires", "0d", "the duration '0d' is out of range"),
        ("--expires", "99999999999999d", "at most 10 years"),
        ("--expires", "soon", "cannot read the duration 'soon'"),
        ("--channel", "../etc", "invalid channel name"),
    ],
)
def test_publish_usage_errors_exit_2(
    option: str,
    value: str,
    message: str,
    bundles: Bundles,
    keys: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = tmp_path / "store"
    code, _, err = run_cli(
        ["ota", "publish", bundles.make(2), "--store", store, "--key", keys["key"], option, value],
        capsys,
    )
    assert code == 2 and err.startswith("error: ") and message in err, (code, err)
    assert not (store / "bundles").exists(), "nothing was written"


def test_refresh_and_agent_refuse_a_bad_channel_name(
    keys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        ["ota", "refresh", "--store", tmp_path, "--channel", "a/b", "--key", keys["key"]], capsys
    )
    assert code == 2 and "invalid channel name" in err
    code, _, err = run_cli(
        [
            "ota",
            "agent",
            "--root",
            tmp_path / "r",
            "--channel",
            "a b",
            "--once",
            "--key",
            keys["pub"],
        ],
        capsys,
    )
    assert code == 2 and "'channel'" in err, err


@pytest.mark.parametrize("where", ["under-a-file", "lock-is-a-folder"])
def test_an_unusable_agent_root_exits_2(
    where: str, keys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if where == "under-a-file":
        (tmp_path / "blocker").write_text("not a folder")
        root = tmp_path / "blocker" / "root"
    else:
        root = tmp_path / "root"
        (root / "agent.lock").mkdir(parents=True)
    code, _, err = run_cli(
        ["ota", "agent", "--root", root, "--once", "--key", keys["pub"], "--target", "x86-cpu"],
        capsys,
    )
    assert code == 2 and f"error: cannot use the agent root {root}" in err, err
    assert "internal error" not in err


def test_a_corrupt_status_file_is_reported_not_a_crash(
    device: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (device / "status.json").write_bytes(b'{"status": "insta')
    code, out, err = run_cli(["ota", "status", "--root", device], capsys)
    assert code == 0, err
    assert "status.json is unreadable" in err
    shown = json.loads(out)
    assert shown["last"] is None and shown["slots"]["a"]["version"] == 1
    (device / "status.json").write_bytes(b"[" * 100_000)
    code, out, err = run_cli(["ota", "status", "--root", device], capsys)
    assert code == 0 and json.loads(out)["last"] is None


def test_strings_from_a_bundle_are_escaped_on_the_terminal(
    device: Path,
    bundles: Bundles,
    keys: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    evil = bundles.make(2, target="x86\x1b[2J\x1b]0;pwned\x07-cpu")
    code, out, err = run_cli(
        ["ota", "install", evil, "--root", device, "--key", keys["pub"], "--target", "x86-cpu"],
        capsys,
    )
    assert code == 1 and "built for target" in err, err
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert "\\x1b[2J" in err


def test_publish_refuses_a_bundle_whose_target_is_no_profile_name(
    bundles: Bundles, keys: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = bundles.make(2, target="x86\x1b[2J-cpu")
    store = tmp_path / "store"
    code, out, err = run_cli(
        ["ota", "publish", evil, "--store", store, "--key", keys["key"]], capsys
    )
    assert code == 2 and "is not a device profile name" in err, err
    assert "\x1b" not in out + err and "\\x1b[2J" in err
    assert not list(store.rglob("*.tar")), "nothing was written"


def test_agent_options_are_made_from_agent_config(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Same types and bounds as AgentConfig, and None unless given (agent.yaml's value applies)."""
    import click

    from edgesmith.devices.ota.cli import ota_agent
    from edgesmith.devices.ota.config import AgentConfig
    from edgesmith.options import click_type

    checked = []
    for param in ota_agent.params:
        if param.name not in AgentConfig.model_fields or param.name == "root":  # a click.Path
            continue
        expected, _ = click_type(AgentConfig, param.name)
        assert type(param.type) is type(expected), param.name
        if isinstance(expected, click.FloatRange):
            assert (param.type.min, param.type.min_open) == (expected.min, expected.min_open)  # type: ignore[attr-defined]
        assert param.default in (None, click.core.UNSET), param.name  # type: ignore[attr-defined]
        checked.append(param.name)
    assert {"poll_interval_s", "latency_budget_ms", "server", "channel", "report_url"} <= set(
        checked
    )
    # a bound the model sets is refused by the flag already, with the flag's name
    code, _, err = run_cli(["ota", "agent", "--root", tmp_path, "--interval", "0"], capsys)
    assert code == 2 and "--interval" in err


def test_agent_yaml_lists_every_problem_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """agent.yaml goes through the one validation layer: every bad key, its line, a suggestion."""
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"root: {tmp_path / 'root'}\npoll_interval_s: -1\ntimeout: 3\nmax_attempts: zero\n"
    )
    code, _, err = run_cli(["ota", "agent", "--config", config, "--once"], capsys)
    assert code == 2, err
    assert f"{config}: 3 problems: line 2: 'poll_interval_s'" in err, err
    assert "line 3: unknown key 'timeout'" in err and "line 4: 'max_attempts'" in err
    assert "did you mean 'timeout_s'?" in err and "Traceback" not in err
    assert not (tmp_path / "root").exists(), "nothing was written"
