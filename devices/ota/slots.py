"""A/B slots on the device and the atomic switch between them.

Layout under the agent's root folder::

    ROOT/
      current -> slots/a     the model in use (a relative symbolic link; serve and apps load it)
      slots/a/  slots/b/     two complete, verified bundle folders
      incoming/              downloads in progress (<sha256>.part, resumable)
      state.json             device id, last channel seq, failed versions, the open transaction
      status.json            the last update result
      agent.lock             one agent per root

Only the slot that ``current`` does not point to is ever written. The switch creates a new link
under a temporary name and renames it over ``current`` (``rename(2)`` is atomic), then fsyncs
the folder, so after a power cut ``current`` names the old or the new slot, never neither.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from typing import IO, Any

from edgesmith.errors import UpdateError
from edgesmith.fsutil import atomic_write_bytes
from edgesmith.runtime.bundle import fsync_dir

__all__ = ["SLOTS", "Slots"]

log = logging.getLogger(__name__)

SLOTS = ("a", "b")
CURRENT = "current"


class Slots:
    """The A/B layout under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.current = self.root / CURRENT
        self.slots_dir = self.root / "slots"
        self.incoming = self.root / "incoming"
        self.state_file = self.root / "state.json"
        self.status_file = self.root / "status.json"
        self._lock: IO[bytes] | None = None

    def prepare(self) -> None:
        """Create the folders; remove what an interrupted run left (temporary links and slots)."""
        self.slots_dir.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(exist_ok=True)
        for p in self.root.glob(".current.tmp-*"):
            p.unlink()
        for p in self.slots_dir.glob(".*"):  # half-extracted slots
            shutil.rmtree(p, ignore_errors=True)

    def lock(self) -> None:
        """Take the root's lock (released by the OS if the agent dies).

        Raises:
            UpdateError: another agent holds it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.root / "agent.lock", "ab")  # noqa: SIM115 - held for the agent's life
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise UpdateError(
                f"another edgesmith agent is running on {self.root}",
                hint="stop it first (systemctl stop edgesmith-agent), or give another --root",
            ) from None
        self._lock = f

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def active(self) -> str | None:
        """The slot ``current`` points to, or None."""
        try:
            target = os.readlink(self.current)
        except OSError:
            return None
        name = Path(target).name
        return name if name in SLOTS and Path(target).parent.name == "slots" else None

    def inactive(self) -> str:
        return "b" if self.active() == "a" else "a"

    def path(self, slot: str) -> Path:
        return self.slots_dir / slot

    def clear(self, slot: str) -> None:
        """Remove a slot's contents (never the active one)."""
        if slot == self.active():
            raise UpdateError(f"refusing to clear the active slot {slot}", hint="this is a bug")
        p = self.path(slot)
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.exists():
            # rename first so that a crash mid-delete leaves a hidden folder prepare() removes
            doomed = self.slots_dir / f".{slot}.old"
            shutil.rmtree(doomed, ignore_errors=True)
            p.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        fsync_dir(self.slots_dir)

    def switch(self, slot: str, step: Any = None) -> None:
        """Point ``current`` at ``slot`` atomically and durably.

        ``step`` (if given) is called with ``switch:linked`` and ``switch:renamed`` between the
        system calls: the crash points the fault tests use.

        The ``rename(2)`` is the commit point: if this raises, :meth:`active` tells whether the
        switch happened (an error after the rename, e.g. in the folder's fsync, leaves it done).
        """
        if slot not in SLOTS or not self.path(slot).is_dir():
            raise UpdateError(f"slot {slot} is empty", hint="install a bundle into it first")
        tmp = self.root / f".current.tmp-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(f"slots/{slot}", tmp)
        try:
            if step:
                step("switch:linked")
            os.replace(tmp, self.current)  # the commit point
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if step:
            step("switch:renamed")
        fsync_dir(self.root)

    # ------------------------------------------------------------------ state

    def read_state(self) -> Any:
        """The parsed ``state.json`` (None if there is none or it cannot be read; see state.py)."""
        try:
            data = self.state_file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read %s (%s); starting with an empty state", self.state_file, exc)
            return None
        try:
            return json.loads(data)
        except (ValueError, RecursionError):
            # a lost state file costs a re-download, never the model in use
            log.warning("%s is corrupt; starting with an empty state", self.state_file)
            return None

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write_bytes(
            self.state_file, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
        )
        fsync_dir(self.root)

    def write_status(self, status: dict[str, Any]) -> None:
        atomic_write_bytes(
            self.status_file, (json.dumps(status, indent=2, sort_keys=True) + "\n").encode()
        )
