"""Helpers shared by the device and OTA tests (the fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edgesmith.runtime.bundle import MANIFEST, Manifest, read_bundle, write_bundle

REPO = Path(__file__).resolve().parents[2]


class Bundles:
    """Derives signed versions and variants of the reference bundle (cached per session)."""

    def __init__(self, ref: Path, keys: dict[str, Path], root: Path) -> None:
        self.ref, self.keys, self.root = ref, keys, root
        self.manifest = read_bundle(ref)

    def make(
        self,
        version: int,
        key: str | None = "key",
        target: str | None = None,
        golden_scale: float | None = None,
        tag: str = "",
    ) -> Path:
        """Signed bundle folder ``version`` (key None: unsigned; golden_scale: a model whose
        last layer is scaled, so it loads but fails its golden check)."""
        out = self.root / f"v{version}-{key}-{target}-{golden_scale}{tag}"
        if out.exists():
            return out
        m = self.manifest.to_json()
        for k in ("schema", "files", "created"):
            m.pop(k)
        m["version"] = version
        if target:
            m["target"] = target
        files = {rel: self.ref / rel for rel in self.manifest.files}
        if golden_scale is not None:
            files[self.manifest.model] = _scaled_model(
                self.ref / self.manifest.model, golden_scale, self.root
            )
        write_bundle(out, m, files, sign_key=self.keys[key] if key else None)
        return out

    def tar(self, version: int, **kw: Any) -> Path:
        from edgesmith.runtime.bundle import pack_bundle

        folder = self.make(version, **kw)
        out = folder.with_suffix(".tar")
        if not out.exists():
            pack_bundle(folder, out)
        return out


def _scaled_model(onnx_path: Path, scale: float, work: Path) -> Path:
    """The same network with its final bias shifted: it loads and runs, but answers differently."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    last = model.graph.initializer[-1]
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim == 1 and arr.shape[0] == 10:  # the classifier bias
            last = init
    arr = numpy_helper.to_array(last).astype(np.float32)
    arr = arr + scale * np.arange(arr.size, dtype=np.float32)
    last.CopyFrom(numpy_helper.from_array(arr, last.name))
    out = work / f"scaled-{scale}" / onnx_path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


class StoreServer(ThreadingHTTPServer):
    """Serves a folder over HTTP/1.1 with Range support, logs requests and injects faults.

    ``faults[path] = [("drop", n_bytes)]`` closes the connection after n bytes of the body
    (one-shot, in order); ``("status", 503)`` answers with that status; ``("trickle", ms)``
    sends the headers, then one byte of the body every ``ms`` milliseconds (a slowloris store);
    ``("trickle-headers", ms)`` sends even the status line and headers that way.
    """

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _StoreHandler)
        self.root = root
        self.requests: list[dict[str, Any]] = []
        self.faults: dict[str, list[tuple[str, int]]] = {}
        self.bytes_sent = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _StoreHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StoreServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        path = self.path.split("?")[0]
        with srv.lock:
            srv.requests.append({"path": path, "range": self.headers.get("Range")})
            fault = srv.faults.get(path, []).pop(0) if srv.faults.get(path) else None
        if fault and fault[0] == "status":
            self.send_error(fault[1])
            return
        if fault and fault[0] == "trickle-headers":
            self._trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", fault[1])
            return
        file = (srv.root / path.lstrip("/")).resolve()
        if not file.is_relative_to(srv.root.resolve()) or not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            start = int(first)
            end = int(last) + 1 if last else len(data)
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body, status = data[start:end], 206
        else:
            body = data
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        self.end_headers()
        if fault and fault[0] == "trickle":
            self._trickle(body, fault[1])
            return
        if fault and fault[0] == "drop":
            body = body[: fault[1]]
            self.wfile.write(body)
            self.wfile.flush()
            srv.bytes_sent += len(body)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)
        srv.bytes_sent += len(body)

    def _trickle(self, data: bytes, ms: int) -> None:
        self.close_connection = True
        for i in range(len(data)):
            try:
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
            except OSError:  # the client gave up: what the test wants
                return
            self.server.bytes_sent += 1
            time.sleep(ms / 1000)

    def do_POST(self) -> None:  # status reports
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(min(n, 1 << 16))
        with self.server.lock:
            self.server.requests.append({"path": self.path, "post": json.loads(body)})
            fault = (
                self.server.faults.get(self.path, []).pop(0)
                if self.server.faults.get(self.path)
                else None
            )
        if fault and fault[0] == "trickle-headers":
            self._trickle(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", fault[1])
            return
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_config(root: Path, server: str | None, keys: dict[str, Path], **kw: Any) -> Any:
    from edgesmith.devices.ota import AgentConfig

    base: dict[str, Any] = {
        "root": root,
        "server": server,
        "trusted_keys": [keys["pub"]],
        "target": "x86-cpu",
        "device_id": root.name,
        "switch_grace_s": 0,
        "retry_backoff_s": 0.01,
        "timeout_s": 10,
        "poll_interval_s": 3600,
        "announce_min_interval_s": 0.2,
    }
    base.update(kw)
    return AgentConfig(**base)


def publish(
    store: Path,
    bundle: Path,
    keys: dict[str, Path],
    rollout: float = 100.0,
    key: str = "key",
    **kw: Any,
) -> Any:
    from edgesmith.devices.ota import publish as _publish

    return _publish(bundle, store, "stable", keys[key], rollout=rollout, **kw)


def installed_manifest(root: Path) -> Manifest:
    """The model in use on a device, fully verified (hashes) and health-checked."""
    from edgesmith.devices.ota import check_health

    current = root / "current"
    assert current.is_symlink(), f"{current} is missing: the device has no model"
    m = read_bundle(current, verify=True)
    report = check_health(current)
    assert report.ok, report.reason
    return m


def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgesmith", "-q", *args]


def manifest_bytes(folder: Path) -> bytes:
    return (folder / MANIFEST).read_bytes()
