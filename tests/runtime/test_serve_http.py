"""``edgesmith serve`` as a real process, driven over HTTP with httpx: protocol, limits, bad input."""

from __future__ import annotations

import json
import threading

import httpx
import numpy as np
import pytest
from _serving import ServerProcess, infer_body, output_of

from edgesmith.runtime import load

TOKEN = "s3cret-token"
INFER = "/v2/models/fmnist-cnn/infer"


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve")
    token_file = workdir / "token"
    token_file.write_text(TOKEN + "\n")
    s = ServerProcess(
        [
            str(models.bundle),
            "--token-file",
            str(token_file),
            "--max-body-mb",
            "0.5",
            "--max-batch",
            "8",
        ],
        workdir,
    )
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    ) as c:
        yield c


def test_health_and_metadata(server, client, models):
    assert f"on http://127.0.0.1:{server.port}" in server.log()  # loopback unless --host
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}  # no token needed
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    meta = client.get("/v2/models/fmnist-cnn").json()
    assert meta["name"] == "fmnist-cnn" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"][0]["shape"] == [-1, 10]
    assert client.get("/v2/models/fmnist-cnn/versions/1/ready").json() == {
        "name": "fmnist-cnn",
        "ready": True,
    }
    assert client.get("/v2").json()["name"] == "edgesmith"
    assert client.get("/v2/models/other").status_code == 404
    assert "not served" in client.get("/v2/models/fmnist-cnn/versions/7").json()["error"]


def test_infer_matches_direct_inference(client, models):
    direct = load(models.bundle)
    x = models.inputs[:5]
    r = client.post(INFER, json=infer_body(x, id="req-1"))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (
        doc["id"] == "req-1" and doc["model_name"] == "fmnist-cnn" and doc["model_version"] == "1"
    )
    assert doc["outputs"][0]["datatype"] == "FP32"
    np.testing.assert_allclose(output_of(doc), direct(x), atol=1e-5)
    # raw uint8 images are preprocessed as the bundle manifest says
    img = models.images[7]
    r = client.post(INFER, json=infer_body(img))
    np.testing.assert_allclose(output_of(r.json()), direct(models.inputs[7:8]), atol=1e-4)
    # nested data is accepted as well as flat data
    body = infer_body(x[:1])
    body["inputs"][0]["data"] = x[:1].tolist()
    np.testing.assert_allclose(
        output_of(client.post(INFER, json=body).json()), direct(x[:1]), atol=1e-5
    )


def test_concurrent_requests_get_their_own_answers(client, models):
    direct = load(models.bundle)(models.inputs[:40])
    results: dict[int, np.ndarray] = {}

    def one(i: int) -> None:
        r = client.post(INFER, json=infer_body(models.inputs[i : i + 1]))
        results[i] = output_of(r.json())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(40):
        np.testing.assert_allclose(results[i][0], direct[i], atol=1e-5)


def _nan_body(x):
    body = json.dumps(infer_body(x))
    return body.replace("0.25", "NaN", 1)


def _bodies(models):
    x = models.inputs[:1].copy()
    x[0, 0, 0, 0] = 0.25
    good = infer_body(x)
    wrong_count = infer_body(x)
    wrong_count["inputs"][0]["data"] = wrong_count["inputs"][0]["data"][:-1]
    ragged = infer_body(x)
    ragged["inputs"][0]["data"] = [[1.0, 2.0], [3.0]]
    return [
        (
            "wrong dtype",
            infer_body(x.astype(np.float64)),
            422,
            "datatype FP64, the model takes FP32",
        ),
        ("wrong shape", infer_body(models.inputs[:1, :, :27, :]), 422, "has shape [1, 1, 27, 28]"),
        ("NaN", _nan_body(x), 422, "contains NaN or Inf"),
        ("Inf", json.dumps(good).replace("0.25", "Infinity", 1), 422, "contains NaN or Inf"),
        ("malformed JSON", b'{"inputs": [', 400, "not valid JSON"),
        ("not an object", b"[1, 2]", 400, "must be a JSON object"),
        ("no inputs", {"id": "x"}, 400, "no 'inputs' array"),
        ("unknown input", infer_body(x, name="image"), 422, "takes ['input']"),
        ("data short of its shape", wrong_count, 400, "holds 783 values but shape"),
        ("ragged data", ragged, 400, "not a rectangular array"),
        (
            "unknown datatype",
            {"inputs": [{**good["inputs"][0], "datatype": "FP8"}]},
            400,
            "unknown datatype",
        ),
        ("too many samples", infer_body(models.inputs[:9]), 422, "at most 8 per batch"),
        ("unknown output", {**good, "outputs": [{"name": "logits"}]}, 422, "unknown output"),
        ("bad timeout", {**good, "parameters": {"timeout": "soon"}}, 400, "microseconds"),
    ]


def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(client, models):
    direct = load(models.bundle)
    for what, body, status, message in _bodies(models):
        content = body if isinstance(body, bytes | str) else json.dumps(body)
        r = client.post(INFER, content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (what, r.text)
        assert message in r.json()["error"], (what, r.json())
        # and the next good request is still answered correctly
        x = models.inputs[3:4]
        np.testing.assert_allclose(
            output_of(client.post(INFER, json=infer_body(x)).json()), direct(x), atol=1e-5
        )


def test_oversized_bodies_get_413(client, models):
    big = json.dumps(infer_body(models.inputs[:8])) + " " * (600 << 10)  # > --max-body-mb 0.5
    r = client.post(INFER, content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "at most 524288" in r.json()["error"]

    def chunks():  # no Content-Length: the limit holds while streaming
        for _ in range(64):
            yield b" " * (16 << 10)

    r = client.post(INFER, content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "over 524288 bytes" in r.json()["error"]
    assert client.post(INFER, json=infer_body(models.inputs[:1])).status_code == 200


def test_bearer_token_is_required(server, models):
    body = infer_body(models.inputs[:1])
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = httpx.post(server.url + INFER, json=body, headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert httpx.get(server.url + "/metrics", headers=headers).status_code == 401
    ok = httpx.post(server.url + INFER, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200


def test_deadline_passed_gives_504(client, models):
    r = client.post(INFER, json=infer_body(models.inputs[:1], parameters={"timeout": 1}))
    assert r.status_code == 504 and "deadline" in r.json()["error"]
    assert client.post(INFER, json=infer_body(models.inputs[:1])).status_code == 200


def test_metrics_are_prometheus_text(client, models):
    client.post(INFER, json=infer_body(models.inputs[:3]))
    text = client.get("/metrics").text
    assert 'edgesmith_requests_total{code="200",endpoint="infer"}' in text
    assert 'edgesmith_request_duration_seconds_bucket{endpoint="infer",le="0.005"}' in text
    assert "edgesmith_batch_size_bucket" in text and "edgesmith_queue_depth 0.0" in text
    assert 'edgesmith_model_info{backend="onnxruntime",name="fmnist-cnn"' in text
    count = [ln for ln in text.splitlines() if ln.startswith("edgesmith_batch_size_sum")]
    assert float(count[0].split()[-1]) >= 3


def test_cli_refuses_a_bad_model_with_one_line(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    r = subprocess.run(
        [sys.executable, "-m", "edgesmith", "serve", str(bad), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
