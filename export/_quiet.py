"""Keep converters' progress output and warnings off the console (shared by the exporters)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator

__all__ = ["quiet"]

_LOGGERS = (
    "torch.onnx",
    "torch.export",
    "torch._dynamo",
    "torch._export",
    "onnxscript",
    "torch.fx.experimental.symbolic_shapes",
    "absl",
    "nncf",
    "litert_torch",
)


@contextlib.contextmanager
def _fd2_to_devnull() -> Iterator[None]:
    """C++ converters (TFLite's MLIR passes, absl) write to file descriptor 2 directly."""
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence converters: loggers, warnings, stdout/stderr prints and native stderr output.

    Errors still surface as exceptions; ``--debug`` shows their tracebacks.
    """
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    env = {k: os.environ.get(k) for k in ("LITERT_TORCH_SHOW_PROGRESS", "TF_CPP_MIN_LOG_LEVEL")}
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
                _fd2_to_devnull(),
            ):
                yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
