"""The CLI contract: exit codes 0/1/2, one `error:` line plus a hint, no traceback, --help everywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgesmith import __version__
from edgesmith.cli import COMMANDS, cli, main
from tests.conftest import BASE_RECIPE, write_recipe


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def _all_commands() -> list[list[str]]:
    paths = []
    for name in COMMANDS:
        cmd = cli.get_command(click.Context(cli), name)
        assert cmd is not None
        paths.append([name])
        if isinstance(cmd, click.Group):
            paths += [[name, sub] for sub in cmd.list_commands(click.Context(cmd))]
    return paths


def test_version() -> None:
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output


@pytest.mark.parametrize("path", _all_commands(), ids=lambda p: " ".join(p))
def test_every_command_has_help(path: list[str]) -> None:
    res = CliRunner().invoke(cli, [*path, "--help"])
    assert res.exit_code == 0
    assert "Usage: " in res.output and " ".join(path) in res.output


def test_user_error_is_one_line_plus_hint_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _out, err = run_main(
        ["build", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "o")], capsys
    )
    lines = err.strip().splitlines()
    assert code == 2
    assert lines[0].startswith("error: recipe file not found")
    assert lines[1].startswith("hint: ")
    assert len(lines) == 2 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_usage_errors_use_the_same_style(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["biuld"], capsys)
    assert code == 2 and err.startswith("error: unknown command 'biuld'; did you mean 'build'?")
    code, _, err = run_main(["build"], capsys)
    assert (
        code == 2
        and err.startswith("error: Missing argument 'RECIPE'")
        and "hint: see 'edgesmith build --help'" in err
    )


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from edgesmith.errors import RecipeError

    with pytest.raises(RecipeError):
        main(["--debug", "recipe", "check", str(tmp_path / "missing.yaml")])


def test_existing_output_folder_is_refused_unless_force(
    recipe_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "existing"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    recipe = write_recipe(recipe_dir, BASE_RECIPE)
    code, _, err = run_main(["build", str(recipe), "-o", str(out)], capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    assert (out / "precious.txt").read_text() == "x"


def test_recipe_check_reports_problems_and_missing_files(
    recipe_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_recipe(recipe_dir, BASE_RECIPE)
    code, out, _ = run_main(["recipe", "check", str(good)], capsys)
    assert code == 0 and "ok: t for x86-cpu" in out
    (recipe_dir / "weights.safetensors").unlink()
    code, _, err = run_main(["recipe", "check", str(good)], capsys)
    assert code == 2 and "files not found: model.weights" in err
    bad = write_recipe(
        recipe_dir, BASE_RECIPE.replace("target: x86-cpu", "target: [1]"), "bad.yaml"
    )
    code, _, err = run_main(["recipe", "check", str(bad)], capsys)
    assert code == 2 and "'target': expected a valid string or a valid dictionary (got [1])" in err


def test_recipe_init_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("mine")
    code, _, err = run_main(["recipe", "init", str(path)], capsys)
    assert code == 2 and "already exists" in err
    assert path.read_text() == "mine"


def test_run_prints_top_k_labels(
    reference_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from edgesmith.data import read_fashion_mnist

    images, labels = read_fashion_mnist("/usr/share/datasets/fashion-mnist", "test")
    for i in (0, 1):
        Image.fromarray(images[i]).save(tmp_path / f"{i}.png")
    bundle = reference_build / "bundles" / "fmnist-cnn-onnx-fp32"
    code, out, _ = run_main(
        ["run", str(bundle), str(tmp_path / "0.png"), str(tmp_path / "1.png"), "-k", "2"], capsys
    )
    assert code == 0
    first, second = out.strip().splitlines()
    assert first.split(": ", 1)[1].startswith("Ankle boot (") and labels[0] == 9
    assert second.split(": ", 1)[1].startswith("Pullover (") and labels[1] == 2
    assert first.count("(") == 2  # top-2


def test_run_rejects_wrong_shape_and_dtype(
    reference_build: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    onnx_file = reference_build / "fmnist-cnn-onnx-fp32.onnx"
    np.save(tmp_path / "wrong_shape.npy", np.zeros((1, 3, 32, 32), np.float32))
    np.save(tmp_path / "wrong_dtype.npy", np.zeros((1, 1, 28, 28), np.float64))
    code, _, err = run_main(["run", str(onnx_file), str(tmp_path / "wrong_shape.npy")], capsys)
    assert code == 2 and "has shape [1, 3, 32, 32], expected [batch, 1, 28, 28]" in err
    code, _, err = run_main(["run", str(onnx_file), str(tmp_path / "wrong_dtype.npy")], capsys)
    assert code == 2 and "has dtype float64, expected float32" in err and "astype" in err


def test_export_writes_one_onnx_file_after_parity(
    recipe_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(recipe_dir, BASE_RECIPE)
    out = tmp_path / "e" / "m.onnx"
    code, stdout, err = run_main(["export", str(recipe), "-o", str(out)], capsys)
    assert code == 0, err
    assert "top-1 agreement 1.0000" in stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx"]


def test_console_script_runs_as_a_real_process(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "edgesmith", "recipe", "check", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert res.stderr.startswith("error: recipe file not found") and "Traceback" not in res.stderr


def test_error_lines_escape_terminal_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Names in error messages come from files (tensor names, manifest strings): an escape
    sequence in one must reach the terminal escaped, while a message's own lines stay lines."""
    recipe = tmp_path / "evil\x1b[2J.yaml"
    recipe.write_text("name: [unclosed\n")
    code, _, err = run_main(["recipe", "check", str(recipe)], capsys)
    assert code == 2
    assert "\x1b" not in err and "\\x1b[2J" in err
    assert err.count("\n") >= 2 and err.splitlines()[1].startswith("hint: ")
