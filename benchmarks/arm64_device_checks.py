"""The device-side checks of ``arm64_emulated.py`` under an emulated core: ``devices detect``,
``bundle verify --target``, ``run``, ``serve`` (one OIP v2 request) and one ``ota agent`` update
from a loopback store, each a named pass/fail :class:`Checks` entry."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from arm64_userland import Emulator

ROOT = Path(__file__).resolve().parent.parent
CORES = {
    "cortex-a72": "rpi4",
    "cortex-a76": "rpi5",
}  # emulated core -> the board whose files it sees
NAME = "fmnist-cnn"


class Checks:
    """Named pass/fail results, printed as they come."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, core: str, name: str, ok: bool, detail: str = "", seconds: float = 0.0) -> None:
        self.items.append(
            {
                "core": core,
                "check": name,
                "ok": bool(ok),
                "detail": detail,
                "seconds": round(seconds, 1),
            }
        )
        print(
            f"  [{'ok' if ok else 'FAIL'}] {core}: {name}{': ' + detail if detail else ''}",
            flush=True,
        )

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.items if not c["ok"]]


def _edgesmith(*args: str, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The host's edgesmith (this checkout) as a subprocess."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run(
        [sys.executable, "-m", "edgesmith", *args], env=env, capture_output=True, text=True
    )
    if log is not None:
        log.write_text(res.stdout + res.stderr)
    if res.returncode:
        raise RuntimeError(
            f"edgesmith {' '.join(args[:2])} failed:\n{(res.stdout + res.stderr)[-3000:]}"
        )
    return res


def _bundle(bundles: dict[str, Path], target: str, fmt: str, precision: str) -> Path:
    return bundles[target] / f"{NAME}-{fmt}-{precision}"


def _serve_store(store: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(store))
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def _cli_checks(
    emu: Emulator,
    python: Path,
    core: str,
    bundles: dict[str, Path],
    keys: Path,
    work: Path,
    checks: Checks,
) -> None:
    board = CORES[core]
    script = python.parent / "edgesmith"  # the installed console script, run by the emulated python
    pub = str(keys / "release.pub")

    def cli(*args: str, timeout: float = 1800) -> tuple[subprocess.CompletedProcess[str], float]:
        t0 = time.perf_counter()
        res = emu.run(python, str(script), *args, cwd=work, timeout=timeout)
        return res, time.perf_counter() - t0

    res, s = cli("devices", "detect", "--json")
    got = json.loads(res.stdout).get("profile") if res.returncode == 0 else res.stderr[-300:]
    checks.add(core, "devices detect", got == board, f"profile {got} (board files of {board})", s)

    own = _bundle(bundles, board, "onnx", "int8")
    res, s = cli("bundle", "verify", str(own), "--key", pub, "--target", board)
    checks.add(core, f"bundle verify --target {board}", res.returncode == 0, res.stdout.strip(), s)
    other = _bundle(bundles, "jetson-orin-nano", "onnx", "int8")
    res, s = cli("bundle", "verify", str(other), "--key", pub, "--target", board)
    checks.add(
        core,
        f"bundle verify --target {board} refuses a jetson bundle",
        res.returncode == 1,
        res.stderr.strip().splitlines()[0] if res.stderr.strip() else f"exit {res.returncode}",
        s,
    )

    from edgesmith.runtime import load

    png = work / "image.png"
    for fmt in ("onnx", "tflite"):
        b = _bundle(bundles, board, fmt, "int8")
        expect = load(b, device="cpu").predict(
            np.load(work / "images.npy", allow_pickle=False)[:1], top_k=1
        )[0][0][0]
        res, s = cli("run", str(b), str(png), "--json")
        label = (
            json.loads(res.stdout)["results"][0]["top"][0]["label"] if res.returncode == 0 else None
        )
        checks.add(
            core,
            f"edgesmith run {b.name}",
            label == expect,
            f"{label} (x86: {expect})" if label else res.stderr[-300:],
            s,
        )

    _serve_check(emu, python, script, core, own, work, checks)
    _ota_check(emu, python, script, core, own, keys, work, checks)


def _serve_check(
    emu: Emulator, python: Path, script: Path, core: str, bundle: Path, work: Path, checks: Checks
) -> None:
    ready, log = work / f"serve-{core}.port", work / f"serve-{core}.log"
    ready.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = emu.popen(
        python,
        str(script),
        "serve",
        str(bundle),
        "--port",
        "0",
        "--ready-file",
        str(ready),
        "--threads",
        "2",
        cwd=work,
        log=log,
    )
    ok, detail = False, ""
    try:
        while not ready.is_file() and proc.poll() is None and time.perf_counter() - t0 < 900:
            time.sleep(1)
        if not ready.is_file():
            detail = f"not ready: {log.read_text()[-300:]}"
        else:
            url = f"http://127.0.0.1:{int(ready.read_text())}"
            with np.load(bundle / "golden.npz", allow_pickle=False) as g:
                x, expected = g["inputs"][:1], g["outputs"][:1]
            body = {
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "data": x.ravel().tolist(),
                    }
                ]
            }
            req = urllib.request.Request(
                f"{url}/v2/models/{NAME}/infer",
                json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=300) as r:
                out = json.loads(r.read())["outputs"][0]
            got = np.asarray(out["data"], np.float32).reshape(out["shape"])
            ok = int(got.argmax()) == int(expected.argmax())
            detail = f"OIP v2 infer: class {int(got.argmax())} (golden {int(expected.argmax())}), max diff {float(np.abs(got - expected).max()):.2g}"
    except Exception as exc:  # a failed request is a failed check, with its reason
        detail = f"{type(exc).__name__}: {exc}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
    checks.add(core, f"edgesmith serve {bundle.name}", ok, detail, time.perf_counter() - t0)


def _ota_check(
    emu: Emulator,
    python: Path,
    script: Path,
    core: str,
    bundle: Path,
    keys: Path,
    work: Path,
    checks: Checks,
) -> None:
    store, device = work / f"store-{core}", work / f"device-{core}"
    for d in (store, device):
        shutil.rmtree(d, ignore_errors=True)
    _edgesmith(
        "ota", "publish", str(bundle), "--store", str(store), "--key", str(keys / "release.key")
    )
    httpd, url = _serve_store(store)
    t0 = time.perf_counter()
    try:
        res = emu.run(
            python,
            str(script),
            "ota",
            "agent",
            "--once",
            "--root",
            str(device),
            "--server",
            url,
            "--key",
            str(keys / "release.pub"),
            "--device-id",
            f"emulated-{core}",
            cwd=work,
            timeout=1800,
        )
    finally:
        httpd.shutdown()
    try:
        result = json.loads(res.stdout)
    except json.JSONDecodeError:
        result = {"status": "no result", "reason": res.stderr[-300:]}
    current = device / "current"
    installed = current.is_dir() and json.loads((current / "manifest.json").read_text())["version"]
    ok = res.returncode == 0 and result.get("status") == "installed" and installed == 1
    checks.add(
        core,
        f"ota agent update from a loopback store ({bundle.name})",
        ok,
        f"status {result.get('status')} {result.get('reason', '')}".strip(),
        time.perf_counter() - t0,
    )
