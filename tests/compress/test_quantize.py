"""The quantize stage end to end on the reference CNN: int8 for every format, variants, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgesmith.pipeline import build
from edgesmith.recipe import load_recipe
from edgesmith.runtime import load, read_bundle
from tests.conftest import write_recipe
from tests.golden import assert_structure

# a build of three formats x four precisions: minutes on a loaded machine
pytestmark = pytest.mark.timeout(600)

RECIPE = """\
version: 1
name: q
model:
  factory: model.py:SmallCNN
  weights: weights.safetensors
  input: {shape: [1, 1, 28, 28], dtype: float32}
data:
  kind: fashion-mnist
  calibration: 128
  eval: 400
target: x86-cpu
stages:
  - quantize: {max_accuracy_drop: 0.005, precisions: [int8, fp16, bf16, w8]}
export: [onnx, openvino, tflite]
"""


@pytest.fixture(scope="module")
def quant_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    import shutil

    from tests.conftest import FMNIST_DIR

    folder = tmp_path_factory.mktemp("quant")
    for name in ("model.py", "weights.safetensors"):
        shutil.copy(FMNIST_DIR / name, folder / name)
    out = folder / "out"
    report = build(load_recipe(write_recipe(folder, RECIPE)), out, bundle_version=3)
    return out, report


def _arts(report: dict) -> dict[tuple[str, str], dict]:
    return {(a["format"], a["precision"]): a for a in report["artifacts"]}


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "tflite"])
def test_int8_within_budget_parity_and_size(fmt: str, quant_build: tuple[Path, dict]) -> None:
    out, report = quant_build
    arts = _arts(report)
    fp32, int8 = arts[(fmt, "fp32")], arts[(fmt, "int8")]
    q = int8["quantization"]
    assert (
        q["tool"]
        == {"onnx": "onnxruntime.quantization", "openvino": "nncf", "tflite": "ai-edge-quantizer"}[
            fmt
        ]
    )
    # the x86-cpu profile's scheme: per-channel symmetric weights, asymmetric uint8 activations, QDQ
    assert q["scheme"] == {
        "weights": "per-channel-symmetric",
        "activations": "asymmetric-uint8",
        "format": "QDQ",
        "calibration_method": "minmax",
        "target_vnni": False,
    }
    # bias correction in PyTorch before export, on by default: every conv / linear layer corrected
    assert q["bias_correction"]["method"] == "bias-correction"
    assert q["bias_correction"]["layers"] >= 6 and q["bias_correction"]["batch_norms_folded"] == 4
    # one accuracy contract: the budget is the gate; the int8 parity tolerance follows from it
    contract = q["accuracy_contract"]
    assert contract["gate"] == "max_accuracy_drop" and contract["max_accuracy_drop"] == 0.005
    assert contract["parity"]["source"] == "budget" and contract["parity"]["top1_agreement"] == 0.75
    assert q["speed"]["baseline"] == "fp32" and q["speed"]["ratio"] > 0
    assert q["calibration_samples"] == 128
    assert q["accuracy_drop"] <= 0.005
    assert int8["accuracy"] >= report["baseline"]["accuracy"] - 0.005
    assert int8["parity"]["passed"] and int8["parity"]["top1_agreement"] >= 0.97
    assert fp32["size_bytes"] / int8["size_bytes"] >= 3.5
    assert (out / int8["path"]).is_file()
    manifest = read_bundle(out / int8["bundle"])
    assert manifest.precision == "int8" and manifest.format == fmt and manifest.version == 3
    assert q["float_layers"] == [] and q["int8_layers"] == q["layers"] >= 4


def test_onnx_int8_is_qdq_per_channel_u8s8(quant_build: tuple[Path, dict]) -> None:
    import onnx
    from onnx import numpy_helper

    out, report = quant_build
    model = onnx.load(str(out / _arts(report)[("onnx", "int8")]["path"]))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    weights = [n for n in dq if n.input[0] in inits and inits[n.input[0]].ndim >= 2]
    acts = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(weights) >= 6 and all(inits[n.input[0]].dtype == np.int8 for n in weights)
    assert all(inits[n.input[1]].size > 1 for n in weights)  # one scale per output channel
    assert acts and all(inits[n.input[2]].dtype == np.uint8 for n in acts)
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)


def test_tflite_int8_is_full_integer(quant_build: tuple[Path, dict]) -> None:
    from ai_edge_litert.interpreter import Interpreter

    out, report = quant_build
    interp = Interpreter(model_path=str(out / _arts(report)[("tflite", "int8")]["path"]))
    assert interp.get_input_details()[0]["dtype"] == np.int8
    assert interp.get_output_details()[0]["dtype"] == np.int8
    kinds = {d["dtype"] for d in interp.get_tensor_details()}
    assert np.int8 in kinds and np.int32 in kinds  # int8 tensors, int32 biases
    assert load(out / _arts(report)[("tflite", "int8")]["path"]).info["quantized_io"] is True


def test_half_precision_and_weight_only_variants(quant_build: tuple[Path, dict]) -> None:
    out, report = quant_build
    arts = _arts(report)
    for fmt in ("onnx", "openvino", "tflite"):
        fp32 = arts[(fmt, "fp32")]["size_bytes"]
        assert 0.4 < arts[(fmt, "fp16")]["size_bytes"] / fp32 < 0.6
        assert arts[(fmt, "w8")]["size_bytes"] / fp32 < 0.33
        for precision in ("fp16", "w8"):
            a = arts[(fmt, precision)]
            assert a["parity"]["passed"], (fmt, precision, a["parity"])
            assert abs(a["accuracy"] - report["baseline"]["accuracy"]) <= 0.005
    # bf16 exists where a runtime runs it (OpenVINO on this CPU); the others say why not
    bf16 = arts[("openvino", "bf16")]
    assert load(out / bf16["path"]).info["inference_precision"] == "bf16"
    assert bf16["parity"]["max_abs_diff"] > 0 and bf16["parity"]["passed"]
    assert load(out / arts[("openvino", "fp32")]["path"]).info["inference_precision"] == "f32"
    assert ("onnx", "bf16") not in arts and ("tflite", "bf16") not in arts
    assert "onnxruntime" in arts[("onnx", "fp32")]["skipped_variants"]["bf16"]
    assert "bf16" in arts[("tflite", "fp32")]["skipped_variants"]


def test_stage_row_and_report(quant_build: tuple[Path, dict]) -> None:
    out, report = quant_build
    (row,) = report["stages"]
    assert row["name"] == "quantize"
    assert row["quantization"]["precisions"] == ["int8", "fp16", "bf16", "w8"]
    assert row["quantization"]["max_accuracy_drop"] == 0.005
    assert json.loads((out / "report.json").read_text()) == report
    assert len(report["artifacts"]) == 3 * 4 + 1  # fp32, int8, fp16, w8 x 3 + bf16 for openvino
    md = (out / "report.md").read_text()
    assert "| `q-tflite-int8.tflite` | tflite | int8 |" in md
    # the int8 section: which check decided, the float layers and the speed verdict per artifact
    assert "### `q-onnx-int8.onnx`" in md
    assert "accuracy gate: max_accuracy_drop (max_accuracy_drop 0.005)" in md
    assert "decided by: max_accuracy_drop" in md and "layers kept float: 0 of" in md
    assert "the time of fp32" in md
    assert_structure("report-quantize", report)  # every key of the public format, as before


def test_int8_backbone_with_a_trainable_head(tmp_path: Path) -> None:
    """A trainable-head build quantizes the backbone; the budget and parity count head(backbone(x))."""
    from tests.finetune_helpers import HEAD_RECIPE

    recipe = HEAD_RECIPE.replace(
        "export: [onnx]", "stages:\n  - quantize: {max_accuracy_drop: 0.01}\nexport: [onnx]"
    ).replace("calibration: 64", "calibration: 128")
    report = build(load_recipe(write_recipe(tmp_path, recipe)), tmp_path / "out", bundle_version=1)
    fp32, int8 = (_arts(report)[("onnx", p)] for p in ("fp32", "int8"))
    assert int8["accuracy"] >= fp32["accuracy"] - 0.01
    assert int8["parity"]["passed"] and int8["parity"]["top1_agreement"] >= 0.97
    bundle = tmp_path / "out" / int8["bundle"]
    model = load(bundle)
    assert model.head is not None and model.head.classes == 10  # logits, not 64 features
    x = np.load(bundle / "golden.npz")["inputs"]
    assert model(x).shape == (len(x), 10)
    assert model.features(x).shape == (len(x), 64)


def test_openvino_int8_runs_int8_kernels_on_x86(quant_build: tuple[Path, dict]) -> None:
    """x86's CPU plugin runs every int8 layer of the NNCF model in int8, so load() takes it; on Arm
    (fp32 kernels) the same bundle is refused (benchmarks/arm64_emulated.py); the weight-only
    model (int8 weights, no FakeQuantize) is not an int8-compute model and loads anywhere."""
    out, _report = quant_build
    int8 = load(out / "bundles" / "q-openvino-int8")
    assert int8.info["precision"] == "int8" and "float_fallback" not in int8.info
    w8 = load(out / "bundles" / "q-openvino-w8")
    assert w8.info["weights"] == "int8" and "float_fallback" not in w8.info


class _Text(str):
    def astype(self, _type: type) -> str:
        return str(self)


class _ArmCompiled:
    """A real compiled model whose runtime model reports what OpenVINO's CPU plugin reports on
    64-bit Arm for the same int8 IR (benchmarks/arm64_emulated.py): every layer in f32."""

    def __init__(self, compiled: object) -> None:
        self._compiled = compiled

    def __getattr__(self, name: str) -> object:
        return getattr(self._compiled, name)

    def get_runtime_model(self) -> object:
        runtime = self._compiled.get_runtime_model()  # type: ignore[attr-defined]

        class _Op:
            def __init__(self, op: object) -> None:
                self._op = op

            def get_rt_info(self) -> dict:
                rt = {k: _Text(v.astype(str)) for k, v in self._op.get_rt_info().items()}  # type: ignore[attr-defined]
                if rt.get("runtimePrecision") in ("i8", "u8"):
                    rt["runtimePrecision"] = _Text("f32")
                return rt

        class _Model:
            def get_ops(self) -> list:
                return [_Op(op) for op in runtime.get_ops()]

        return _Model()


def test_openvino_int8_that_would_run_float_kernels_is_refused(
    quant_build: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the plugin runs the int8 layers with float kernels (Arm), load() refuses the bundle
    with a message naming the layers and the way out; allow_float_fallback runs it and says so."""
    import openvino as ov

    from edgesmith.errors import ModelLoadError
    from edgesmith.runtime.backends import openvino as backend

    class _ArmCore:
        def __init__(self) -> None:
            self._core = ov.Core()

        def __getattr__(self, name: str) -> object:
            return getattr(self._core, name)

        def compile_model(self, *args: object) -> _ArmCompiled:
            return _ArmCompiled(self._core.compile_model(*args))

    monkeypatch.setattr(backend, "_get_core", _ArmCore)
    out, _report = quant_build
    bundle = out / "bundles" / "q-openvino-int8"
    with pytest.raises(ModelLoadError, match=r"int8 layers run with float kernels") as err:
        load(bundle)
    assert "allow_float_fallback" in (err.value.hint or "")
    model = load(bundle, options={"allow_float_fallback": True})
    assert "float kernels" in model.info["float_fallback"]
    fp32 = load(out / "bundles" / "q-openvino-fp32")  # no int8 layers: nothing to refuse
    assert "float_fallback" not in fp32.info
