"""A running `edgesmith serve --watch <root>/current` picks up an OTA update without dropping
requests (the server of issue 6, `edgesmith.runtime.serve`, and the OTA agent together).

The contract this test pins down (see docs/ota.md, "Hot swap with edgesmith serve"):
- `edgesmith serve PATH --watch --port N` serves the bundle PATH points to, on 127.0.0.1:N;
- about once a second it re-resolves PATH (a symbolic link) and, when the target or the
  manifest changed, loads the new bundle and swaps it in without failing in-flight requests;
- `GET /v2/models/{name}` lists the bundle version in `versions` (Open Inference Protocol v2).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from ota_helpers import Bundles, agent_cmd, agent_config, free_port

from edgesmith.devices.ota import Agent


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_serve_watch_swaps_to_the_new_model_without_dropping_requests(
    provisioned_v1: Path, bundles: Bundles, keys: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "dev"
    shutil.copytree(provisioned_v1, root, symlinks=True)
    port = free_port()
    server = subprocess.Popen(
        agent_cmd("serve", str(root / "current"), "--watch", "--port", str(port)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    name = bundles.manifest.name
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/v2/health/ready", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("edgesmith serve did not become ready")
                time.sleep(0.2)
        assert "1" in _get(f"{base}/v2/models/{name}")["versions"]
        with np.load(bundles.ref / "golden.npz") as g:
            x = g["inputs"][:1].astype(np.float32)
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "data": x.ravel().tolist(),
                    }
                ]
            }
        ).encode()
        codes: list[int] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                req = urllib.request.Request(
                    f"{base}/v2/models/{name}/infer",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                try:
                    with urllib.request.urlopen(req, timeout=10) as r:
                        codes.append(r.status)
                except urllib.error.HTTPError as exc:
                    codes.append(exc.code)

        t = threading.Thread(target=load)
        t.start()
        time.sleep(0.5)
        agent = Agent(agent_config(root, None, keys))
        agent.start()
        try:
            assert agent.install(bundles.make(2)).status == "installed"
        finally:
            agent.close()
        deadline = time.monotonic() + 15
        while "2" not in _get(f"{base}/v2/models/{name}")["versions"]:
            assert time.monotonic() < deadline, "the server did not pick up version 2"
            time.sleep(0.2)
        time.sleep(0.5)
        stop.set()
        t.join()
        assert len(codes) > 10 and set(codes) == {200}, f"dropped requests: {sorted(set(codes))}"
    finally:
        server.terminate()
        server.wait(timeout=10)
