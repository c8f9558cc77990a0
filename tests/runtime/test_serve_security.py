"""``edgesmith serve`` under attack (issue 12, row 2, row 10 and item 3), as a real process: a
request's size is bounded from its declared shapes before any work, heavy work stays off the
event loop, and the server can insist on signed bundles, at start and on every hot swap.

Timings are in ``benchmarks/serve_security.py``; here only robust bounds are asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from _tiny import expected, tiny_bundle

from edgesmith.runtime.signing import generate_keypair

INFER = "/v2/models/tiny/infer"
BODY_LIMIT_MB = 1


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return tiny_bundle(root / "bundle", root / "work")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    key, pub, _ = generate_keypair(d / "release")
    wrong_key, _, _ = generate_keypair(d / "wrong")
    return {"key": key, "pub": pub, "wrong_key": wrong_key}


def _peak_rss_reset(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


class _HealthProbe(threading.Thread):
    """Asks /v2/health/ready every 20 ms and records how long each answer took."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.latencies, self.stop = url, [], threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                assert c.get(self.url + "/v2/health/ready").status_code == 200
                self.latencies.append(time.perf_counter() - t0)
                time.sleep(0.02)


def _uint8_body(shape: list[int]) -> bytes:
    n = int(np.prod(shape))
    data = b"[" + b",".join([b"7"] * n) + b"]"
    head = json.dumps({"name": "input", "shape": shape, "datatype": "UINT8"})[:-1].encode()
    return b'{"inputs":[' + head + b',"data":' + data + b"}]}"


def test_tiny_images_cost_nothing_before_the_batch_check(serve, bundle: Path) -> None:
    """Row 2: UINT8 [N,1,1,1] images that the server would resize (8x8 here) used to be
    preprocessed, in a Python loop on the event loop, before the batch-size check: ~5 GiB of RSS
    per MiB of body, and /v2/health blocked for seconds."""
    s = serve(bundle, "--max-body-mb", BODY_LIMIT_MB, "--max-batch", 8)
    limit = BODY_LIMIT_MB << 20
    with httpx.Client(base_url=s.url, timeout=120) as c:
        ok = c.post(INFER, content=_uint8_body([8, 8, 8, 1]))
        assert ok.status_code == 200, ok.text
        rss_before = psutil.Process(s.proc.pid).memory_info().rss
        exact = _peak_rss_reset(s.proc.pid)
        body = _uint8_body([limit // 2 - 64, 1, 1, 1])  # "7," per image: just under the limit
        assert len(body) <= limit
        t0 = time.perf_counter()
        r = c.post(INFER, content=body)
        took = time.perf_counter() - t0
        assert r.status_code == 422 and "at most 8 per batch" in r.json()["error"], r.text
        if exact:
            growth = _peak_rss(s.proc.pid) - rss_before
            # the target: under 4x the body limit plus the model's working set (here ~nothing);
            # before the fix this request took several GiB
            assert growth < 4 * limit + (16 << 20), growth / 2**20
        assert took < 30  # minutes before the fix (a third of a second here now)
        assert c.post(INFER, content=_uint8_body([8, 8, 8, 1])).status_code == 200


def test_big_honest_requests_do_not_block_health(serve, bundle: Path) -> None:
    """Large images within the limits are parsed and resized in worker threads: the event loop
    keeps answering health checks while several are in flight."""
    s = serve(bundle, "--max-body-mb", 4, "--max-batch", 8)
    body = _uint8_body([8, 300, 300, 1])  # 720,000 pixels, resized to 8x8
    assert len(body) < 4 << 20
    probe = _HealthProbe(s.url)
    probe.start()
    statuses: list[int] = []

    def client() -> None:
        with httpx.Client(base_url=s.url, timeout=120) as c:
            for _ in range(3):
                statuses.append(c.post(INFER, content=body).status_code)

    workers = [threading.Thread(target=client) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    probe.stop.set()
    probe.join()
    assert statuses == [200] * 9
    assert len(probe.latencies) >= 3
    # generous: the machine is shared; a blocked loop took seconds per request
    assert max(probe.latencies) < 5.0, max(probe.latencies)


def test_a_trickled_body_is_cut_off_at_its_deadline(serve, bundle: Path) -> None:
    """A client that sends its body a byte at a time would hold a connection and its buffer for
    as long as it liked: the body must arrive within --body-timeout (408), and the server keeps
    answering everyone else meanwhile."""
    import socket
    from urllib.parse import urlparse

    s = serve(bundle, "--body-timeout", 1.5)
    url = urlparse(s.url)
    body = _uint8_body([1, 8, 8, 1])
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head + body[:10])
        t0 = time.perf_counter()
        answer = b""
        sent = 10
        sock.settimeout(0.2)
        while b"\r\n\r\n" not in answer and time.perf_counter() - t0 < 20:
            if sent < len(body) - 1:  # a byte every 0.2 s, never the last one
                sock.sendall(body[sent : sent + 1])
                sent += 1
            with contextlib.suppress(TimeoutError):
                answer += sock.recv(4096)
            if time.perf_counter() - t0 < 1.0:  # others are served while it trickles
                assert httpx.get(s.url + "/v2/health/ready").status_code == 200
        took = time.perf_counter() - t0
        sock.settimeout(5)
        while not answer.endswith(b"}"):  # the JSON error may come in a second packet
            more = sock.recv(4096)
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive within 1.5 s" in answer
    assert 1.0 < took < 15, took
    ok = httpx.post(s.url + INFER, content=body)  # the server is unharmed
    assert ok.status_code == 200, ok.text


def test_an_accepted_body_at_the_limit_stays_within_its_memory_bound(serve, bundle: Path) -> None:
    """The memory target for requests that are served, not only refused: a body just under the
    limit (FP32 images, nested lists: the most Python objects per byte) costs under 4x the body
    limit plus the model's working set (~nothing here) at its peak."""
    s = serve(bundle, "--max-body-mb", BODY_LIMIT_MB, "--max-batch", 4096)
    limit = BODY_LIMIT_MB << 20
    n = 64
    x = np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)
    nested = json.dumps(x.tolist()).encode()
    while len(nested) < limit - 4096:  # grow the batch until the body nearly fills the limit
        n *= 2
        x = np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)
        nested = json.dumps(x.tolist()).encode()
        if len(nested) > limit - 256:
            n //= 2
            x = x[:n]
            nested = json.dumps(x.tolist()).encode()
            break
    body = (
        b'{"inputs":[{"name":"input","shape":' + json.dumps(list(x.shape)).encode()
        + b',"datatype":"FP32","data":' + nested + b"}]}"
    )  # fmt: skip
    assert limit // 2 < len(body) <= limit
    with httpx.Client(base_url=s.url, timeout=120) as c:
        assert c.post(INFER, content=_uint8_body([8, 8, 8, 1])).status_code == 200
        rss_before = psutil.Process(s.proc.pid).memory_info().rss
        if not _peak_rss_reset(s.proc.pid):
            pytest.skip("this kernel does not let VmHWM be reset (/proc/PID/clear_refs)")
        r = c.post(INFER, content=body)
        assert r.status_code == 200, r.text[:300]
        growth = _peak_rss(s.proc.pid) - rss_before
    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(len(x), -1)
    np.testing.assert_allclose(got, expected(x), atol=1e-4)
    assert growth < 4 * limit + (16 << 20), growth / 2**20


@pytest.mark.parametrize(
    "timeout", [b"1" + b"0" * 400, b"1e400", b"NaN", b"-1", b"86400000001", b'"soon"']
)
def test_out_of_range_timeouts_are_400(serve, bundle: Path, timeout: bytes) -> None:
    s = serve(bundle)
    x = np.zeros((1, 1, 8, 8), np.float32)
    body = (
        b'{"inputs":[{"name":"input","shape":[1,1,8,8],"datatype":"FP32","data":'
        + json.dumps(x.ravel().tolist()).encode()
        + b'}],"parameters":{"timeout":'
        + timeout
        + b"}}"
    )
    r = httpx.post(s.url + INFER, content=body)
    assert r.status_code == 400 and "microseconds" in r.json()["error"], r.text
    ok = httpx.post(s.url + INFER, content=body.replace(timeout, b"5000000"))
    assert ok.status_code == 200
    np.testing.assert_allclose(ok.json()["outputs"][0]["data"], expected(x)[0], atol=1e-5)


def test_server_can_require_signed_bundles_at_start_and_on_swap(
    serve, tmp_path: Path, keys: dict[str, Path]
) -> None:
    from _serving import ServerProcess

    def make(name: str, version: int, key: Path | None) -> Path:
        from edgesmith.runtime.bundle import write_bundle
        from edgesmith.runtime.model import load

        src = tiny_bundle(tmp_path / f"src-{name}", tmp_path / f"w-{name}")
        m = load(src).manifest
        assert m is not None
        doc = {k: v for k, v in m.to_json().items() if k not in ("schema", "files", "created")}
        doc["version"] = version
        files = {rel: src / rel for rel in m.files}
        write_bundle(tmp_path / name, doc, files, sign_key=key)
        return tmp_path / name

    signed = make("signed", 1, keys["key"])
    unsigned = make("unsigned", 2, None)
    wrong = make("wrong", 3, keys["wrong_key"])
    good = make("good", 4, keys["key"])
    policy = ["--key", keys["pub"], "--require-signature"]

    with pytest.raises(RuntimeError, match="exited with 2") as info:
        ServerProcess([str(unsigned), *map(str, policy)], tmp_path)
    assert "is not signed, and this device accepts signed bundles only" in str(info.value)
    with pytest.raises(RuntimeError, match="exited with 2") as info:
        ServerProcess([str(signed), "--require-signature"], tmp_path)
    assert "needs the publisher's public key" in str(info.value)

    current = tmp_path / "current"
    current.symlink_to(signed)
    s = serve(current, "--watch", "--watch-interval", "0.1", *policy)

    def version() -> str:
        return httpx.get(s.url + "/v2/models/tiny").json()["versions"][0]

    def swap_to(target: Path) -> None:
        tmp = tmp_path / "current.tmp"
        tmp.symlink_to(target)
        os.replace(tmp, current)

    assert version() == "1"
    for refused, message in ((unsigned, "is not signed"), (wrong, "none of which is trusted")):
        swap_to(refused)
        deadline = time.monotonic() + 30
        while message not in s.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert message in s.log() and "still serving tiny v1" in s.log()
        assert version() == "1"
    swap_to(good)
    deadline = time.monotonic() + 30
    while version() != "4" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert version() == "4"
