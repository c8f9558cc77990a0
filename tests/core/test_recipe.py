from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgesmith.errors import RecipeError
from edgesmith.recipe import dump_recipe, load_recipe, parse_recipe
from tests.conftest import BASE_RECIPE, write_recipe
from tests.golden import assert_golden


def test_reference_recipe_resolves_paths_against_its_folder(fmnist_recipe: Path) -> None:
    r = load_recipe(fmnist_recipe)
    assert r.name == "fmnist-cnn"
    assert r.model.input.shape == [1, 1, 28, 28]
    assert r.model.weights == str(fmnist_recipe.parent / "weights.safetensors")
    assert r.model.factory == f"{fmnist_recipe.parent / 'model.py'}:SmallCNN"
    assert r.export == ["onnx"]
    assert r.parity["fp32"].top1_agreement == 0.999


def test_importable_module_factory_is_left_alone(tmp_path: Path) -> None:
    text = BASE_RECIPE.replace("model.py:SmallCNN", "torch.nn:Identity")
    r = load_recipe(write_recipe(tmp_path, text))
    assert r.model.factory == "torch.nn:Identity"


def test_unknown_key_reports_line_and_suggestion(tmp_path: Path) -> None:
    text = BASE_RECIPE.replace("  weights: weights.safetensors", "  weigths: weights.safetensors")
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, text))
    assert ":5: unknown key 'model.weigths'" in e.value.message
    assert e.value.hint == "did you mean 'weights'?"


def test_wrong_type_reports_key_path_line_and_value(tmp_path: Path) -> None:
    text = BASE_RECIPE.replace("calibration: 64", "calibration: lots")
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, text))
    assert ":9: 'data.calibration'" in e.value.message
    assert "'lots'" in e.value.message


def test_missing_field_is_named(tmp_path: Path) -> None:
    text = BASE_RECIPE.replace("  input: {shape: [1, 1, 28, 28], dtype: float32}\n", "")
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, text))
    # the model's input is named, with both ways of giving it
    assert "'model': give exactly one of 'input'" in e.value.message
    assert "'inputs'" in e.value.message


def test_several_problems_are_all_reported_in_line_order(tmp_path: Path) -> None:
    text = BASE_RECIPE.replace("target: x86-cpu", "target: rpi-5").replace(
        "export: [onnx]", "export: [onnxx]"
    )
    text = text.replace("name: t", "name: t\nfoo: 1")
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, text))
    msg = e.value.message
    assert "3 problems" in msg
    assert (
        msg.index("line 3: unknown key 'foo'")
        < msg.index("unknown target 'rpi-5'")
        < msg.index("unknown export format 'onnxx'")
    )
    assert "did you mean 'rpi5'?" in (e.value.hint or "")
    assert "did you mean 'onnx'?" in (e.value.hint or "")


def test_malformed_yaml_gives_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, "name: x\nmodel: [1, 2\n"))
    assert "malformed YAML" in e.value.message
    assert ":3:" in e.value.message


def test_yaml_is_parsed_with_the_safe_loader(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(RecipeError):
        load_recipe(write_recipe(tmp_path, text))
    assert not marker.exists()


def test_unknown_stage_lists_known_ones(tmp_path: Path) -> None:
    text = BASE_RECIPE + "stages:\n  - shrink: {amount: 2}\n"
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, text))
    assert ":14: unknown stage 'shrink'" in e.value.message
    assert "known stages" in (e.value.hint or "")


def test_missing_file_and_non_mapping() -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe("/nonexistent/recipe.yaml")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        parse_recipe([1, 2], Path("."))


def test_data_needs_exactly_one_source(tmp_path: Path) -> None:
    text = BASE_RECIPE.replace("  kind: fashion-mnist\n", "  kind: fashion-mnist\n  factory: x:y\n")
    with pytest.raises(RecipeError, match="exactly one of 'kind'"):
        load_recipe(write_recipe(tmp_path, text))


def test_round_trip_through_dump(fmnist_recipe: Path) -> None:
    r = load_recipe(fmnist_recipe)
    again = parse_recipe(dump_recipe(r), fmnist_recipe.parent)
    assert dump_recipe(again) == dump_recipe(r)


def test_dumped_demo_recipe_is_the_golden_one(repo_root: Path) -> None:
    """Every key and default of the recipe format, stages included, as before (a golden file)."""
    folder = repo_root / "examples" / "fashion_mnist"
    r = load_recipe(folder / "recipe.yaml")
    dumped = json.loads(json.dumps(dump_recipe(r)).replace(str(folder), "<recipe folder>"))
    assert_golden("recipe-fmnist-dumped", dumped)
    assert dump_recipe(parse_recipe(dump_recipe(r), folder)) == dump_recipe(r)


def test_template_from_recipe_init_is_a_valid_recipe(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgesmith.cli import cli

    res = CliRunner().invoke(cli, ["recipe", "init", str(tmp_path / "r.yaml")])
    assert res.exit_code == 0, res.output
    r = load_recipe(tmp_path / "r.yaml")
    assert r.name == "my-model" and r.stages == []
    assert "# " in (tmp_path / "r.yaml").read_text()  # commented


def test_partial_parity_entry_keeps_the_other_fields_of_that_precision(tmp_path: Path) -> None:
    text = BASE_RECIPE + "parity:\n  int8: {top1_agreement: 0.94}\n  fp32: {max_abs_diff: 0.01}\n"
    r = load_recipe(write_recipe(tmp_path, text))
    assert r.parity["int8"].top1_agreement == 0.94
    assert r.parity["int8"].max_abs_diff is None  # int8's own default, not the generic 1e-3
    assert r.parity["fp32"].max_abs_diff == 0.01 and r.parity["fp32"].top1_agreement == 0.999
    assert r.parity["fp16"].max_abs_diff == 5e-2  # untouched precisions keep their defaults


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ("  - quantize: {}\n  - prune: {sparsity: 0.5}\n", "'prune' after 'quantize'"),
        ("  - qat: {}\n  - distill: {}\n", "'distill' after 'qat'"),
        ("  - quantize: {}\n  - qat: {}\n", "'qat' after 'quantize': give one quantization stage"),
    ],
)
def test_quantization_comes_last_and_once(tmp_path: Path, stages: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message) as e:
        load_recipe(write_recipe(tmp_path, BASE_RECIPE + "stages:\n" + stages))
    assert ":" in str(e.value).split(message)[0]  # with the line of the offending stage
