"""Helpers for the server tests: a real ``edgesmith serve`` process and OIP v2 request bodies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


class ServerProcess:
    """``edgesmith serve`` running as a real process; ``url`` once it listens."""

    def __init__(self, args: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.ready_file = workdir / f"port-{time.monotonic_ns()}"
        self.log_path = workdir / f"serve-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "edgesmith", "serve", *args, "--port", "0"]
        cmd += ["--ready-file", str(self.ready_file)]
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        deadline = time.monotonic() + 60
        while not self.ready_file.is_file():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"server did not start:\n{self.log()}")
            time.sleep(0.05)
        self.port = int(self.ready_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def infer_body(x: np.ndarray, name: str = "input", **extra: Any) -> dict[str, Any]:
    """An OIP v2 inference request for one float32 tensor."""
    dtype = {"float32": "FP32", "uint8": "UINT8", "float64": "FP64", "int64": "INT64"}[str(x.dtype)]
    return {
        "inputs": [
            {"name": name, "shape": list(x.shape), "datatype": dtype, "data": x.ravel().tolist()}
        ],
        **extra,
    }


def output_of(resp_json: dict[str, Any]) -> np.ndarray:
    out = resp_json["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])
