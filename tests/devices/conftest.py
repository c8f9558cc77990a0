"""Real parts for the device and OTA tests: the reference bundle (built once), Ed25519 keys, an
HTTP store server on loopback with Range support and fault injection, and a mosquitto broker."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ota_helpers import REPO, Bundles, StoreServer, agent_config, free_port

MOSQUITTO = "/usr/sbin/mosquitto"


@pytest.fixture(scope="session")
def ref_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference Fashion-MNIST bundle (unsigned, version 1), built once per session (~15 s).

    Uses the project's shared ``reference_build`` fixture (tests/conftest.py) when there is one,
    so the suite builds the reference model once. Tests only read it.
    """
    try:
        out = Path(request.getfixturevalue("reference_build"))
    except pytest.FixtureLookupError:
        from edgesmith.pipeline import build
        from edgesmith.recipe import load_recipe

        out = tmp_path_factory.mktemp("ref") / "build"
        build(load_recipe(REPO / "examples/fashion_mnist/recipe-fp32.yaml"), out, bundle_version=1)
    report = json.loads((out / "report.json").read_text())
    return out / report["artifacts"][0]["bundle"]


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A release key pair and an unrelated ('wrong') key pair."""
    from edgesmith.runtime.signing import generate_keypair

    d = tmp_path_factory.mktemp("keys")
    rk, rp, _ = generate_keypair(d / "release")
    wk, wp, _ = generate_keypair(d / "wrong")
    return {"key": rk, "pub": rp, "wrong_key": wk, "wrong_pub": wp}


@pytest.fixture(scope="session")
def bundles(
    ref_bundle: Path, keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Bundles:
    return Bundles(ref_bundle, keys, tmp_path_factory.mktemp("bundles"))


@pytest.fixture
def store_server(tmp_path: Path) -> Iterator[StoreServer]:
    root = tmp_path / "store"
    root.mkdir()
    srv = StoreServer(root)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real mosquitto broker on a free loopback port; yields ``host:port``."""
    if not os.access(MOSQUITTO, os.X_OK):
        pytest.skip(f"{MOSQUITTO} is not installed (apt-get install mosquitto; .ci/run does)")
    port = free_port()
    conf = tmp_path_factory.mktemp("mosquitto") / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(
                    f"mosquitto did not start: {proc.stderr.read().decode() if proc.stderr else ''}"
                )
            time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def provisioned_v1(
    bundles: Bundles, keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A device root with signed version 1 installed; tests copy it (copytree keeps the link)."""
    from edgesmith.devices.ota import Agent

    root = tmp_path_factory.mktemp("template") / "device"
    agent = Agent(agent_config(root, None, keys))
    agent.start()
    try:
        result = agent.install(bundles.make(1))
    finally:
        agent.close()
    assert result.status == "installed", result
    (root / "status.json").unlink()
    return root


@pytest.fixture
def device(provisioned_v1: Path, tmp_path: Path) -> Path:
    root = tmp_path / "dev-0001"
    shutil.copytree(provisioned_v1, root, symlinks=True)
    return root
