"""Several inputs and outputs: the recipe schema, samples and batches, and the bad-input rules
(one line naming the input or output and the fix, exit 2, nothing written)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edgesmith.cli import main
from edgesmith.errors import DataError, RecipeError
from edgesmith.feeds import InputLayout, Samples, concat_outputs, example_arrays, sample_inputs
from edgesmith.recipe import dump_recipe, load_recipe, parse_recipe
from tests.conftest import ROOT, write_recipe

DIABETES = ROOT / "examples" / "diabetes"
TOKENS = """\
version: 1
name: tokens
model:
  factory: model.py:DiabetesNet
  inputs:
    - {name: input_ids, shape: [batch, sequence], dtype: int64, pad: 0}
    - {name: attention_mask, shape: [batch, sequence], dtype: int64}
  dims: {sequence: {example: 32, max: 128}}
  outputs: [{name: embedding, kind: embedding}]
data: {factory: data.py:make_datasets}
metric: data.py:r2
export: [onnx, tflite]
"""


@pytest.fixture
def diabetes_dir(tmp_path: Path) -> Path:
    for name in ("model.py", "data.py", "weights.safetensors", "recipe.yaml"):
        shutil.copy(DIABETES / name, tmp_path / name)
    return tmp_path


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    return int(e.value.code or 0), capsys.readouterr().err


def _nothing_written(folder: Path) -> bool:
    return not any(p.name.startswith((".out", "out")) for p in folder.iterdir())


# --------------------------------------------------------------------------- schema


def test_inputs_dims_and_outputs_parse_and_round_trip(tmp_path: Path) -> None:
    r = load_recipe(write_recipe(tmp_path, TOKENS))
    specs = r.model.input_specs()
    assert [s.name for s in specs] == ["input_ids", "attention_mask"]
    assert specs[0].symbolic == {1: "sequence"} and specs[0].dtype == "int64"
    assert r.model.dims["sequence"].max == 128 and r.model.outputs[0].kind == "embedding"
    again = parse_recipe(dump_recipe(r), tmp_path)
    assert again.model == r.model


def test_the_one_input_shorthand_is_named_input(tmp_path: Path) -> None:
    r = load_recipe(DIABETES / "recipe.yaml")
    assert [s.name for s in r.model.input_specs()] == ["features"]
    fmnist = load_recipe(ROOT / "examples" / "fashion_mnist" / "recipe.yaml")
    assert fmnist.model.input_specs()[0].name == "input" and fmnist.model.inputs is None
    assert "inputs" not in dump_recipe(fmnist)["model"]  # a classifier's dump is unchanged


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("  dims: {sequence: {example: 32, max: 128}}\n", ""), "does not size it: add dims"),
        (("kind: embedding", "kind: vector"), "'logits', 'embedding', 'features' or 'regression'"),
        (("metric: data.py:r2", "metric: top1"), "metric 'top1' needs class logits"),
        (("max: 128", "max: null"), "dims.sequence has no 'max': TFLite models have fixed sizes"),
        (("name: attention_mask", "name: input_ids"), "input names listed twice"),
        (("name: embedding", "name: input_ids"), "names used for an input and an output"),
        (("[batch, sequence], dtype: int64, pad", "[batch, 'seq len'], dtype: int64, pad"), None),
    ],
)
def test_recipe_errors_name_the_key(
    tmp_path: Path, edit: tuple[str, str], message: str | None
) -> None:
    text = TOKENS.replace(*edit)
    assert text != TOKENS
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, text))
    assert "Traceback" not in e.value.message
    if message:
        assert message in e.value.message, e.value.message


# --------------------------------------------------------------------------- samples


def test_samples_pad_per_batch_and_come_back_in_order() -> None:
    layouts = [
        InputLayout("ids", "int64", ("batch", "sequence"), pad=0, sizes={1: (4, 16)}),
        InputLayout("mask", "int64", ("batch", "sequence"), pad=0, sizes={1: (4, 16)}),
    ]
    lengths = [5, 2, 9, 3, 7, 2]
    items = [(np.arange(1, n + 1), np.ones(n, np.int64)) for n in lengths]
    s = Samples.from_items(items, layouts)
    assert s.ragged and len(s) == 6
    seen = []
    for idx, (ids, mask) in s.batches(2):
        # batches group similar lengths; padding is the input's pad value, masked out
        assert ids.shape == mask.shape == (len(idx), max(lengths[i] for i in idx))
        assert ids.dtype == np.int64 and (ids[mask == 0] == 0).all()
        seen.append((idx, [mask.sum(1)]))
    out = concat_outputs(seen, len(s))[0]
    assert out.tolist() == lengths  # each sample's result back at its index
    ex = example_arrays(s, layouts, 2)  # 9 tokens cut to the example size 4
    assert [a.shape for a in ex] == [(1, 4), (1, 4)] and ex[0].tolist() == [[1, 2, 3, 4]]
    mx = example_arrays(s, layouts, 1, at="max")  # 2 tokens padded to 16
    assert mx[0].shape == (1, 16) and mx[1].sum() == 2


def test_a_sample_that_does_not_fit_names_the_input() -> None:
    layouts = [
        InputLayout("input_ids", "int64", ("batch", "sequence"), sizes={1: (4, None)}),
        InputLayout("attention_mask", "int64", ("batch", "sequence"), sizes={1: (4, None)}),
    ]
    ids = np.arange(5)
    with pytest.raises(DataError, match=r"eval samples hold 1 input but the model takes 2"):
        sample_inputs(ids, layouts, "eval samples")
    with pytest.raises(
        DataError, match=r"input 'attention_mask' of eval samples have dtype float32"
    ):
        sample_inputs((ids, np.ones(5, np.float32)), layouts, "eval samples")
    with pytest.raises(DataError, match=r"missing \['attention_mask'\]"):
        sample_inputs({"input_ids": ids, "mask": ids}, layouts, "eval samples")
    got = sample_inputs({"attention_mask": ids, "input_ids": ids * 2}, layouts, "eval samples")
    assert got[0].tolist() == (ids * 2).tolist()  # a dict is taken by name


# --------------------------------------------------------------------------- bad input, end to end

FACTORY_TWO_INPUTS = """
import importlib.util
from pathlib import Path
_spec = importlib.util.spec_from_file_location("diabetes_test_data", Path(__file__).with_name("data.py"))
_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_data)
Patients, load = _data.Patients, _data.load
class Twice(Patients):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return (x, x), y
def make():
    xtr, ytr, xte, yte, median = load()
    return Twice(xtr, ytr, median), Twice(xtr[:64], ytr[:64], median), Twice(xte, yte, median)
"""


@pytest.mark.parametrize(
    ("edit", "message", "hint"),
    [
        (
            ("{name: features, shape", "{name: feats, shape"),
            "model.inputs[0] is named 'feats' but argument 1 of DiabetesNet.forward(features) is "
            "'features'",
            "rename model.inputs[0] to 'features'",
        ),
        (
            (
                "    - {name: features, shape: [batch, 10], dtype: float32}\n",
                "    - {name: features, shape: [batch, 10], dtype: float32}\n"
                "    - {name: mask, shape: [batch, 10], dtype: bool}\n",
            ),
            "declares 2 inputs (features, mask) but DiabetesNet.forward(features) takes 1",
            "remove the extra entries",
        ),
        (
            ("dtype: float32}", "dtype: float16}"),
            "samples have dtype float32 but the model input 'features' is declared float16",
            "inputs are never cast",
        ),
        (
            ("factory: data.py:make_datasets", "factory: twice.py:make"),
            "samples hold 2 inputs but the model takes 1 (features)",
            "one array per model input",
        ),
        (
            ("    - {name: risk, kind: logits}\n", ""),
            "model.outputs declares 1 output(s) (progression) but forward returns 2",
            "one entry per returned tensor",
        ),
        (
            ("metric: data.py:r2", "metric: top1"),
            "metric 'top1' needs class logits, but output 'progression' is declared kind: regression",
            "module:function",
        ),
    ],
    ids=["input-name", "extra-input", "dtype", "input-count", "output-count", "metric-kind"],
)
def test_bad_model_io_is_one_line_exit_2_nothing_written(
    diabetes_dir: Path,
    capsys: pytest.CaptureFixture[str],
    edit: tuple[str, str],
    message: str,
    hint: str,
) -> None:
    (diabetes_dir / "twice.py").write_text(FACTORY_TWO_INPUTS)
    text = (diabetes_dir / "recipe.yaml").read_text()
    assert edit[0] in text
    recipe = write_recipe(diabetes_dir, text.replace(*edit), "bad.yaml")
    code, err = _run(["build", str(recipe), "-o", str(diabetes_dir / "out")], capsys)
    assert code == 2, err
    assert message in err and hint in err, err
    assert "Traceback" not in err
    assert _nothing_written(diabetes_dir)


def test_undeclared_outputs_keep_a_classifier_recipe_as_it_was() -> None:
    import torch

    from edgesmith.models import resolve_outputs

    scores, values = torch.zeros(4, 10), torch.zeros(4, 1)
    # top-1 metric or one wide output under a custom metric: class logits, as before
    assert resolve_outputs(None, scores, "top1")[:2] == (("output",), ("logits",))
    _, kinds, note = resolve_outputs(None, scores, "m.py:f1")
    assert kinds == ("logits",) and "declare model.outputs" in note
    # one value per sample is never argmax-judged; several wide outputs are features
    assert resolve_outputs(None, values, "m.py:r2")[1] == ("regression",)
    assert resolve_outputs(None, (scores, scores), "m.py:f")[1] == ("features", "features")
    with pytest.raises(RecipeError, match="metric 'top1' scores one output"):
        resolve_outputs(None, (scores, values), "top1")
