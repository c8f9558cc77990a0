"""Install hooks: ``before_install``, ``after_install`` and ``on_rollback``.

A hook is a Python callable (taking a :class:`HookContext`) or a shell command. Shell commands
run with ``/bin/sh -c`` and see the context as environment variables ``EDGESMITH_HOOK``,
``EDGESMITH_BUNDLE`` (the new slot), ``EDGESMITH_CURRENT`` (the ``current`` link),
``EDGESMITH_NAME``, ``EDGESMITH_VERSION``, ``EDGESMITH_PREVIOUS_VERSION`` and
``EDGESMITH_REASON`` (why a rollback happened). A hook fails by raising or by a non-zero exit;
a failing ``before_install`` or ``after_install`` rolls the update back. Hooks may run twice
for one update if the device loses power in between, so they should be idempotent.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgesmith.errors import UpdateError

__all__ = ["HOOKS", "Hook", "HookContext", "Hooks", "run_hook"]

log = logging.getLogger(__name__)

HOOKS = ("before_install", "after_install", "on_rollback")


@dataclass
class HookContext:
    """What a hook is told about the update."""

    hook: str
    bundle: Path
    current: Path
    name: str
    version: int
    previous_version: int | None
    reason: str = ""

    def env(self) -> dict[str, str]:
        return {
            "EDGESMITH_HOOK": self.hook,
            "EDGESMITH_BUNDLE": str(self.bundle),
            "EDGESMITH_CURRENT": str(self.current),
            "EDGESMITH_NAME": self.name,
            "EDGESMITH_VERSION": str(self.version),
            "EDGESMITH_PREVIOUS_VERSION": ""
            if self.previous_version is None
            else str(self.previous_version),
            "EDGESMITH_REASON": self.reason,
        }


Hook = Callable[[HookContext], object] | str


@dataclass
class Hooks:
    """The three hooks; each None, a callable or a shell command."""

    before_install: Hook | None = None
    after_install: Hook | None = None
    on_rollback: Hook | None = None


def run_hook(hook: Hook | None, ctx: HookContext, timeout_s: float = 300.0) -> None:
    """Run one hook.

    Raises:
        UpdateError: the callable raised, or the command exited non-zero or timed out.
    """
    if hook is None:
        return
    if callable(hook):
        try:
            hook(ctx)
        except Exception as exc:
            raise UpdateError(
                f"{ctx.hook} hook failed: {type(exc).__name__}: {exc}",
                hint="fix the hook; the update was rolled back",
            ) from exc
        return
    try:
        proc = subprocess.run(
            ["/bin/sh", "-c", hook],
            env={**os.environ, **ctx.env()},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise UpdateError(
            f"{ctx.hook} hook timed out after {timeout_s:.0f} s: {hook}",
            hint="make the hook faster or raise hook_timeout_s",
        ) from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise UpdateError(
            f"{ctx.hook} hook exited with {proc.returncode}: {hook}"
            + (f": {tail[0]}" if tail[0] else ""),
            hint="fix the hook; the update was rolled back",
        )
    log.info("%s hook ok: %s", ctx.hook, hook)
