"""A small token model end to end: two int64 inputs of any length (ids + mask), two outputs
(embedding + class logits), int8 in ONNX and OpenVINO with the transformer recipe, the bundle's
manifest and golden data per input/output, load(), the OTA health check and the server with
requests of different lengths (random weights and tokens: these check mechanics, not accuracy)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from edgesmith.cli import main
from edgesmith.errors import InputError
from tests.conftest import write_recipe

MODEL = '''
import torch
from torch import nn


class TinyEncoder(nn.Module):
    """Token embedding + one attention block; masked mean (padding changes nothing)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 32)
        self.block = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).float()
        h = self.block(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1)
        e = e / e.norm(dim=1, keepdim=True).clamp(min=1e-6)
        return e, self.head(e)
'''

DATA = """
import importlib.util
from pathlib import Path

import numpy as np
import torch


def _encoder():
    # loaded by path under its own name: a plain "import model" would leave a module named
    # "model" in sys.modules for every later test
    spec = importlib.util.spec_from_file_location(
        "tokens_test_model", Path(__file__).with_name("model.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.TinyEncoder


class Tokens:
    def __init__(self, n, seed):
        rng = np.random.default_rng(seed)
        self.x = []
        for _ in range(n):
            k = int(rng.integers(3, 13))
            self.x.append((rng.integers(1, 64, k).astype(np.int64), np.ones(k, np.int64)))
        net = _encoder()().eval()
        with torch.no_grad():
            self.y = [net(torch.from_numpy(i)[None], torch.from_numpy(m)[None])[0][0].numpy()
                      for i, m in self.x]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def make():
    return Tokens(16, 0), Tokens(24, 1), Tokens(48, 2)


def mean_cosine(outputs, targets):
    e = np.asarray(outputs["embedding"], np.float64)
    t = np.asarray(targets, np.float64)
    return float((e * t).sum(1).mean() / 1.0)
"""

RECIPE = """\
version: 1
name: tokens
model:
  factory: model.py:TinyEncoder
  inputs:
    - {name: input_ids, shape: [batch, sequence], dtype: int64, pad: 0}
    - {name: attention_mask, shape: [batch, sequence], dtype: int64, pad: 0}
  dims: {sequence: {example: 8, max: 16}}
  outputs: [{name: embedding, kind: embedding}, {name: logits, kind: logits}]
data: {factory: data.py:make}
metric: data.py:mean_cosine
stages:
  - quantize: {scheme: int8, max_accuracy_drop: 0.05, min_calibration_samples: 8}
export: [onnx]
"""


def _build(folder: Path, recipe_text: str) -> Path:
    (folder / "model.py").write_text(MODEL)
    (folder / "data.py").write_text(DATA)
    recipe = write_recipe(folder, recipe_text)
    out = folder / "out"
    with pytest.raises(SystemExit) as e:
        main(["-q", "build", str(recipe), "-o", str(out)])
    assert e.value.code in (0, None)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("tokens"), RECIPE)


def _check_report(out: Path, formats: list[str]) -> dict[tuple[str, str], dict]:
    report = json.loads((out / "report.json").read_text())
    arts = {(a["format"], a["precision"]): a for a in report["artifacts"]}
    assert {(f, "int8") for f in formats} <= set(arts)
    for art in arts.values():
        parity = art["parity"]
        assert parity["passed"] and set(parity["outputs"]) == {"embedding", "logits"}
        assert parity["outputs"]["embedding"]["kind"] == "embedding"
        assert "top1_agreement" not in parity["outputs"]["embedding"]  # never an argmax
        assert parity["mean_cosine"] > (0.999 if art["precision"] == "fp32" else 0.95)
    recipes = report["stages"][0]["quantization"]["int8_recipe"]
    assert set(recipes) == set(formats)
    return arts


def _tokens(length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 64, (1, length)).astype(np.int64), np.ones((1, length), np.int64)


def test_int8_is_judged_by_kind_and_bundles_keep_inputs_and_outputs(built: Path) -> None:
    arts = _check_report(built, ["onnx"])
    # the transformer recipe: ONNX Runtime dynamic int8 (no activation ranges calibrated)
    report = json.loads((built / "report.json").read_text())
    assert report["stages"][0]["quantization"]["int8_recipe"]["onnx"].startswith("onnxruntime")
    assert "| cos 1.0000 |" in (built / "report.md").read_text()  # the first output's measure

    bundle = built / arts[("onnx", "int8")]["bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    ins = {i["name"]: i for i in manifest["inputs"]}
    assert set(ins) == {"input_ids", "attention_mask"}
    assert ins["input_ids"]["dtype"] == "int64" and ins["input_ids"]["shape"] == [
        "batch",
        "sequence",
    ]
    assert ins["input_ids"]["dims"]["1"] == {"name": "sequence", "example": 8, "max": 16}
    assert [(o["name"], o["kind"]) for o in manifest["outputs"]] == [
        ("embedding", "embedding"),
        ("logits", "logits"),
    ]
    rules = {r["name"]: r for r in manifest["golden"]["outputs"]}
    assert rules["embedding"]["min_cosine"] == 0.99 and not rules["embedding"]["top1"]
    assert rules["logits"]["top1"]
    with np.load(bundle / "golden.npz") as g:
        assert set(g.files) == {
            "inputs/input_ids",
            "inputs/attention_mask",
            "outputs/embedding",
            "outputs/logits",
        }
        assert g["inputs/input_ids"].dtype == np.int64


def test_bundle_runs_any_length_and_passes_its_health_check(built: Path) -> None:
    import torch

    from edgesmith.devices.ota.health import check_health
    from edgesmith.runtime import load

    bundle = built / "bundles" / "tokens-onnx-fp32"
    model = load(bundle, device="cpu")
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokens_test_model", built.parent / "model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.TinyEncoder().eval()
    for length in (3, 14):
        ids, mask = _tokens(length, length)
        emb, logits = model.run({"input_ids": ids, "attention_mask": mask}).values()
        with torch.no_grad():
            want = net(torch.from_numpy(ids), torch.from_numpy(mask))
        np.testing.assert_allclose(emb, want[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(logits, want[1].numpy(), atol=1e-5)
    with pytest.raises(Exception, match="not class scores"):
        model.predict(_tokens(4, 0))  # the first output is an embedding: no labels
    # bad inputs: one readable InputError naming the input (the CLI and server map it to exit 2
    # and HTTP 422)
    ids, mask = _tokens(5, 0)
    bad = [
        ({"input_ids": ids}, r"the model takes \['attention_mask', 'input_ids'\]"),
        ({"input_ids": ids.astype(np.float32), "attention_mask": mask}, "'input_ids' has dtype"),
        (
            {"input_ids": ids, "attention_mask": np.ones((1, 6), np.int64)},
            "share the dimension 'sequence' but have sizes 5 and 6",
        ),
    ]
    for feeds, message in bad:
        with pytest.raises(InputError, match=message):
            model.run(feeds)
    # bench feeds the manifest's example sequence length (8), all-ones masks, ids in range
    from edgesmith.runtime.bench import _inputs

    ids, mask = _inputs(model, 4)
    assert ids.shape == mask.shape == (4, 8) and (mask == 1).all() and ids.dtype == np.int64
    health = check_health(bundle, require_golden=True)
    assert health.ok and health.golden, health.reason


def test_server_answers_requests_of_different_lengths_in_one_batch(built: Path) -> None:
    import httpx

    from tests.runtime._serving import ServerProcess

    bundle = built / "bundles" / "tokens-onnx-int8"
    server = ServerProcess([str(bundle), "--max-batch", "8", "--max-wait-ms", "50"], built)
    try:
        url = f"{server.url}/v2/models/tokens/infer"
        results: dict[int, httpx.Response] = {}

        def send(length: int) -> None:
            ids, mask = _tokens(length, length)
            body = {
                "inputs": [
                    {
                        "name": n,
                        "shape": list(a.shape),
                        "datatype": "INT64",
                        "data": a.ravel().tolist(),
                    }
                    for n, a in (("input_ids", ids), ("attention_mask", mask))
                ]
            }
            results[length] = httpx.post(url, json=body, timeout=30)

        threads = [threading.Thread(target=send, args=(n,)) for n in (6, 21, 6, 11)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert {n: r.status_code for n, r in results.items()} == {6: 200, 21: 200, 11: 200}
        outs = {o["name"]: o for o in results[21].json()["outputs"]}
        assert outs["embedding"]["shape"] == [1, 32] and outs["logits"]["shape"] == [1, 3]
        ids, mask = _tokens(5, 0)
        body = {
            "inputs": [
                {"name": n, "shape": list(a.shape), "datatype": "INT64", "data": a.ravel().tolist()}
                for n, a in (("input_ids", ids), ("attention_mask", mask[:, :4]))
            ]
        }
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 422 and "share the dimension 'sequence'" in r.text
    finally:
        server.stop()


@pytest.mark.slow
def test_openvino_and_tflite_int8_of_the_token_model(tmp_path: Path) -> None:
    """NNCF with ModelType.TRANSFORMER, and TFLite at the longest size (int32 ids, padded)."""
    out = _build(tmp_path, RECIPE.replace("export: [onnx]", "export: [openvino, tflite]"))
    arts = _check_report(out, ["openvino", "tflite"])
    manifest = json.loads((out / arts[("tflite", "int8")]["bundle"] / "manifest.json").read_text())
    ids = next(i for i in manifest["inputs"] if i.get("alias", i["name"]) == "input_ids")
    assert ids["shape"] == ["batch", 16] and ids["cast_from"] == ["int64"]


def test_run_command_takes_named_inputs_and_prints_outputs(
    built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = built / "bundles" / "tokens-onnx-fp32"
    ids, mask = _tokens(5, 0)
    np.savez(tmp_path / "good.npz", input_ids=ids, attention_mask=mask)
    np.savez(tmp_path / "bad.npz", input_ids=ids)
    with pytest.raises(SystemExit) as e:
        main(["run", str(bundle), str(tmp_path / "good.npz")])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "embedding [1, 32]" in out and "logits [1, 3]" in out  # values, not labels
    with pytest.raises(SystemExit) as e:
        main(["run", str(bundle), str(tmp_path / "bad.npz")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the model takes ['attention_mask', 'input_ids']" in err
    assert "Traceback" not in err
