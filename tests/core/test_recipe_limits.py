"""A recipe file is bounded before it is built, and a quantization it cannot run is refused when
it is read (issue 12, row 11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgesmith.cli import main
from edgesmith.errors import RecipeError
from edgesmith.recipe import load_recipe
from edgesmith.yamlutil import load_yaml_with_lines
from tests.conftest import BASE_RECIPE, write_recipe


def _laughs(levels: int) -> str:
    """Nested aliases: 8 ** levels values from a few hundred bytes."""
    lines = ["  - &a0 x"]
    for i in range(1, levels + 1):
        lines.append(f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 8) + "]")
    return "  labels:\n" + "\n".join("  " + line for line in lines) + "\n"


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    return int(e.value.code or 0), capsys.readouterr().err


def test_nested_aliases_are_refused_before_expansion(
    recipe_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 6 levels: 262,144 labels from 400 bytes (main took seconds and accepted it; 9 levels: hours)
    text = BASE_RECIPE.replace("  eval: 500\n", "  eval: 500\n" + _laughs(6))
    path = write_recipe(recipe_dir, text)
    assert len(text) < 1000
    with pytest.raises(RecipeError, match="expands to more than") as e:
        load_recipe(path)
    assert "aliases" in (e.value.hint or "")
    code, err = _run(["recipe", "check", str(path)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: ")
    assert len(lines) == 2


def test_a_few_aliases_within_the_limit_still_work(recipe_dir: Path) -> None:
    text = BASE_RECIPE.replace("  eval: 500\n", "  eval: 500\n  labels: [&l cat, *l, *l]\n")
    r = load_recipe(write_recipe(recipe_dir, text))
    assert r.data.labels == ["cat", "cat", "cat"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &a [*a]\n", "refers to a value that contains it"),
        ("&a {name: *a}\n", "refers to a value that contains it"),
        ("x: " + "[" * 100 + "]" * 100 + "\n", "levels deep"),  # the limit is 64
        ("x: " + "[" * 200_000 + "\n", "nest"),
        ("x:\n" + "- 1\n" * 25_000, "more than"),  # the limit is 20,000 values
        ("name: !!python/object/apply:os.system [id]\n", "malformed YAML"),
        ("a: 1\n---\nb: 2\n", "malformed YAML"),
    ],
    ids=["cycle", "cycle-root", "deep", "deep-unclosed", "many", "python-tag", "two-docs"],
)
def test_hostile_documents_give_a_recipe_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_yaml_with_lines(write_recipe(tmp_path, text))


def test_a_folder_and_an_oversized_file_are_named(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="is a folder"):
        load_recipe(tmp_path)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(RecipeError, match="larger than"):
        load_recipe(big)


_QUANT = "stages:\n  - quantize: {calibration_method: %s}\nexport: [%s]\n"


@pytest.mark.parametrize(
    ("method", "formats", "bad"),
    [
        ("mse", "onnx", ["onnx"]),
        ("entropy", "onnx, openvino, tflite", ["openvino", "tflite"]),
        ("percentile", "tflite", ["tflite"]),
    ],
)
def test_unsupported_calibration_method_is_refused_by_recipe_check(
    recipe_dir: Path, capsys: pytest.CaptureFixture[str], method: str, formats: str, bad: list[str]
) -> None:
    text = BASE_RECIPE.replace("export: [onnx]\n", _QUANT % (method, formats))
    path = write_recipe(recipe_dir, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = e.value.message
    assert f"calibration_method '{method}'" in msg and "'quantize'" in msg
    assert msg.startswith(f"{path}:13:")  # the line of the stage
    for fmt in bad:
        assert f"{fmt} (it supports " in msg
    assert "minmax" in (e.value.hint or "")
    code, err = _run(["recipe", "check", str(path)], capsys)
    assert code == 2 and err.startswith("error: ")


def test_supported_calibration_methods_pass(recipe_dir: Path) -> None:
    for method, formats in [
        ("entropy", "onnx"),
        ("mse", "tflite"),
        ("percentile", "onnx, openvino"),
    ]:
        text = BASE_RECIPE.replace("export: [onnx]\n", _QUANT % (method, formats))
        assert load_recipe(write_recipe(recipe_dir, text)).stages[0].name == "quantize"
    # a quantize stage that derives no int8 variant does not calibrate at all
    text = BASE_RECIPE.replace(
        "export: [onnx]\n",
        "stages:\n  - quantize: {calibration_method: mse, precisions: [fp16]}\nexport: [onnx]\n",
    )
    load_recipe(write_recipe(recipe_dir, text))


def test_build_refuses_the_calibration_method_before_any_training(
    recipe_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = BASE_RECIPE.replace(
        "export: [onnx]\n",
        "stages:\n  - distill: {epochs: 5}\n  - qat: {steps: 10, calibration_method: mse}\n"
        "export: [onnx]\n",
    )
    path = write_recipe(recipe_dir, text)
    out = recipe_dir / "out"
    code, err = _run(["build", str(path), "-o", str(out)], capsys)
    assert code == 2
    assert "calibration_method 'mse' of stage 'qat'" in err and "onnx (it supports" in err
    assert not out.exists()


def test_the_table_matches_the_quantizers() -> None:
    from edgesmith.compress.quantize import onnx, openvino, tflite
    from edgesmith.compress.quantize.config import CALIBRATION_SUPPORT

    for fmt, module in (("onnx", onnx), ("openvino", openvino), ("tflite", tflite)):
        assert set(CALIBRATION_SUPPORT[fmt]) == set(module._METHODS), fmt


@pytest.mark.parametrize(
    ("weights", "reason"),
    [
        ('"w\\0.safetensors"', "NUL byte"),
        ("~nosuchuser-edgesmith/w.safetensors", "home directory"),
        ("loop/w.safetensors", "loop"),
    ],
    ids=["nul", "unknown-user", "symlink-loop"],
)
def test_paths_that_cannot_name_a_file_are_recipe_errors(
    recipe_dir: Path, capsys: pytest.CaptureFixture[str], weights: str, reason: str
) -> None:
    (recipe_dir / "loop").symlink_to("loop")
    text = BASE_RECIPE.replace("weights: weights.safetensors", f"weights: {weights}")
    path = write_recipe(recipe_dir, text)
    with pytest.raises(RecipeError, match=reason) as e:
        load_recipe(path)
    assert e.value.message.startswith(f"{path}:5: 'model.weights': cannot use")
    code, err = _run(["recipe", "check", str(path)], capsys)
    assert code == 2 and err.startswith("error: ")
