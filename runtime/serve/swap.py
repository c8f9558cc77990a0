"""Hot swap: what identifies the model behind a path, the check a new model passes before it
serves, and the watch loop that swaps when the path's target changes.

:meth:`Server.swap <edgesmith.runtime.serve.server.Server.swap>` loads a new model (bundles are
verified), checks it on its golden inputs, and switches to it between two batches; requests
already queued finish on the old model, so none fails. With ``watch`` the server re-resolves its
path (a bundle folder, a model file, or a symbolic link such as the OTA agent's ``current``) every
``watch_interval_s`` and swaps when the resolved target or the manifest's version changes; a model
that fails to load or check is logged and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgesmith.errors import CheckFailed, EdgesmithError
from edgesmith.runtime.golden import check_golden
from edgesmith.runtime.model import Model
from edgesmith.text import printable


class Swappable(Protocol):
    """What :func:`watch` needs of the server (:class:`~edgesmith.runtime.serve.server.Server`)."""

    path: Path
    config: Any  # ServeConfig

    @property
    def slot(self) -> Any: ...  # the Slot served now (its ``fingerprint``)

    @property
    def model(self) -> Model: ...

    def swap(self, path: str | Path | None = None) -> Model: ...


__all__ = ["fingerprint", "self_check", "watch"]

log = logging.getLogger("edgesmith.runtime.serve")


def fingerprint(path: Path) -> tuple[Any, ...]:
    """What identifies the model behind ``path``: its resolved target and version (or file stat)."""
    real = os.path.realpath(path)
    if os.path.isdir(real):
        manifest = os.path.join(real, "manifest.json")
        st = os.stat(manifest)
        version = None
        with contextlib.suppress(OSError, ValueError, AttributeError), open(manifest, "rb") as f:
            version = json.loads(f.read(1 << 22)).get("version")
        return (real, version, st.st_mtime_ns, st.st_size)
    st = os.stat(real)
    return (real, None, st.st_mtime_ns, st.st_size, st.st_ino)


def self_check(model: Model, root: Path) -> None:
    """Run a new model once before it serves: on the bundle's golden inputs when it has them
    (:func:`~edgesmith.runtime.golden.check_golden`, as the OTA health check), else on zeros.

    Raises:
        CheckFailed: the model does not reproduce its golden outputs, or gives NaN/Inf on zeros.
    """
    golden = check_golden(model, root) if root.is_dir() else None
    if golden is not None:
        if not golden.ok:
            raise CheckFailed(
                f"{model.name} v{model.version} does not reproduce its golden outputs: "
                f"{golden.reason}",
                hint="the bundle does not run correctly on this device; rebuild it",
            )
        return
    feeds = [
        np.zeros([1 if not isinstance(d, int) else d for d in s.shape], s.np_dtype)
        for s in model.inputs
    ]
    outs = model.run_checked(feeds)
    if any(o.dtype.kind == "f" and not np.isfinite(o).all() for o in outs):
        raise CheckFailed(
            f"{model.name} gives NaN or Inf on a zero input", hint="the model file is broken"
        )


async def watch(server: Swappable) -> None:
    """Re-resolve the server's path every ``watch_interval_s``; swap when its target changes."""
    failed: tuple[Any, ...] | None = None
    while True:
        await asyncio.sleep(server.config.watch_interval_s)
        try:
            fp = await asyncio.to_thread(fingerprint, server.path)
        except OSError as exc:  # the link is being replaced, or the bundle is gone
            if failed != ("missing",):
                log.error(
                    "watch: cannot resolve %s (%s); still serving the current model",
                    printable(server.path),
                    printable(exc),
                )
                failed = ("missing",)
            continue
        assert server.slot is not None
        if fp == server.slot.fingerprint or fp == failed:
            continue
        try:
            await asyncio.to_thread(server.swap, server.path)
            failed = None
        except Exception as exc:
            failed = fp
            msg = exc.message if isinstance(exc, EdgesmithError) else f"{type(exc).__name__}: {exc}"
            log.error(
                "hot swap to %s failed; still serving %s v%s: %s",
                printable(fp[0]),
                server.model.name,
                server.model.version,
                printable(msg),
            )
