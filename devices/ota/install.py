"""The install transaction: one bundle into the inactive slot, checked, switched to, committed —
or abandoned with the old model in use.

One install, in order (each step name is also a crash point for the fault tests)::

    verify -> extract -> before_install -> health -> switch -> after_install -> commit

Every install is a transaction (:class:`~edgesmith.devices.ota.state.Txn`) recorded in
``state.json`` before the inactive slot is touched. Its commit point is the ``rename(2)`` of the
``current`` link in ``switch``: before it, any failure (an error, an ``OSError`` such as a full
disk) leaves the old model in use and closes the transaction; after it, the agent finishes
(``after_install``, commit) or switches back in the same run, and reports what ``current`` then
points at. Only a crash leaves the transaction open: the next start (or, if switching back itself
failed, the next check) settles it. A revert (back to the other slot) is the same transaction
without the extract.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgesmith.errors import BundleError, EdgesmithError, UpdateError
from edgesmith.runtime.bundle import (
    MANIFEST,
    SIGNATURE,
    Manifest,
    extract_bundle,
    fsync_dir,
    verify_bundle,
)

from .channel import Release, iso_utc, utc_now
from .config import AgentConfig, UpdateResult
from .health import check_health
from .hooks import HookContext, Hooks, run_hook
from .policy import check_manifest
from .slots import Slots
from .state import AgentState, Txn
from .trust import Trust, is_local_head

__all__ = ["HISTORY_KEPT", "Transactions", "os_reason"]

log = logging.getLogger("edgesmith.devices.ota.agent")

HISTORY_KEPT = 20  # entries of state.history


class _Rollback(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Gate = Callable[[Path, Manifest], None]


class Transactions:
    """The install transactions of one device root (the base of
    :class:`~edgesmith.devices.ota.agent.Agent`, which adds the lifecycle, checks and reports)."""

    config: AgentConfig
    slots: Slots
    hooks: Hooks
    state: AgentState
    trust: Trust
    profile: Any
    _step_hook: Callable[[str], None] | None
    _unsaved: bool

    # ------------------------------------------------------------------ what is installed

    def installed(self) -> Manifest | None:
        """The manifest of the model in use (cheap: files are not re-hashed)."""
        if self.slots.active() is None:
            return None
        try:
            return verify_bundle(self.slots.current, check_files=False).manifest
        except BundleError:
            return None

    def healthy(self, slot: str) -> bool:
        """Whether ``slot`` holds a bundle that verifies and passes its health check."""
        try:
            self.trust.verify(self.slots.path(slot), self.state)
        except (BundleError, OSError):
            return False
        return check_health(
            self.slots.path(slot), self.config.latency_budget_ms, self.config.require_golden
        ).ok

    def _step(self, name: str) -> None:
        if self._step_hook is not None:
            self._step_hook(name)

    # ------------------------------------------------------------------ state

    def _save_state(self) -> bool:
        """Write ``state.json``; on an OSError log it and retry at the next check."""
        try:
            self.slots.write_state(self.state.to_json())
        except OSError as exc:
            log.error("cannot save %s (%s); retrying later", self.slots.state_file, exc)
            self._unsaved = True
            return False
        self._unsaved = False
        return True

    def _mark_failed(self, name: str, version: int, reason: str, local: bool = False) -> None:
        if not local:  # a refused local head must not block the fleet version of that number
            self.state.failed[f"{name}:{version}"] = reason
        self.state.attempts.pop(f"{name}:{version}", None)
        self.state.txn = None
        self._save_state()

    # ------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        """At start: settle an open transaction, then make sure the model in use verifies."""
        self._settle()
        active = self.slots.active()
        if active is None or self.healthy(active):
            return  # (no model yet: a first install that never switched stays uninstalled)
        other = "b" if active == "a" else "a"
        if self._may_recover_into(other) and self.healthy(other):
            log.error(
                "the model in use (slot %s) is broken; switching back to slot %s", active, other
            )
            try:
                self.slots.switch(other)
            except OSError as exc:
                log.error("cannot switch to slot %s: %s", other, exc)
                return
            self.state.last_switch = time.time()
            self._save_state()
        else:
            log.error("no working model on this device: the other slot is empty, broken or refused")

    def _may_recover_into(self, slot: str) -> bool:
        """Whether recovery may switch to ``slot``: never to a version rolled back here."""
        path = self.slots.path(slot)
        if not path.is_dir():
            return False
        if manifest_digest(path) in self.state.rolled_back:
            log.error("slot %s holds a bundle that was rolled back here; not switching to it", slot)
            return False
        try:
            m = verify_bundle(path, check_files=False).manifest
        except BundleError:
            return False
        if self.state.failed_before(m.name, m.version) and not is_local_head(m):
            log.error("slot %s holds %s %s, which failed here before", slot, m.name, m.version)
            return False
        return True

    def _settle(self) -> None:
        """Close what an earlier run left open: a transaction (a crash, or a rollback that could
        not switch back) and a state that could not be saved."""
        txn = self.state.txn
        if txn is None:
            if self._unsaved:
                self._save_state()
            return
        if txn.undo:
            log.warning("finishing the rollback of the update to version %s", txn.version)
            self._undo_switch(txn, txn.undo)
        elif self.slots.active() == txn.slot:
            log.warning("finishing the update to version %s that a crash interrupted", txn.version)
            self._finish(txn, recheck=True)
        else:
            log.warning("discarding an update to version %s that a crash interrupted", txn.version)
            self.state.txn = None
            self._save_state()

    # ------------------------------------------------------------------ install

    def _install(
        self, src: Path, expect: Release | None, local: bool = False, gate: Gate | None = None
    ) -> UpdateResult:
        keys, strict = self.trust.bundle_keys(), self.config.require_signature
        self._step("verify")
        m = self.trust.verify(src, self.state, local=local).manifest
        installed = self.installed()
        check_manifest(m, expect, installed, self.profile, self.config, self.state, local=local)
        key = f"{m.name}:{m.version}"
        attempts = self.state.attempts
        attempts[key] = int(attempts.get(key, 0)) + 1
        if attempts[key] > self.config.max_attempts:
            self._mark_failed(m.name, m.version, f"install interrupted {attempts[key] - 1} times")
            raise UpdateError(
                f"{m.name} version {m.version}: install interrupted {attempts[key] - 1} times; giving up",
                hint="check the device's logs (out of memory? power?) and publish a fixed version",
            )
        slot = self.slots.inactive()
        txn = Txn(
            slot,
            m.name,
            m.version,
            self.slots.active(),
            installed.version if installed else None,
            local=local,
        )
        dest = self.slots.path(slot)
        try:
            self.state.txn = txn
            self.slots.write_state(self.state.to_json())  # durable before the slot is touched
            self._wait_grace()
            self._step("extract")
            self.slots.clear(slot)
            if src.is_dir():
                self._copy_bundle(src, dest, m)
                self.trust.verify(dest, self.state, local=local)
            else:
                extract_bundle(
                    src,
                    dest,
                    trusted_keys=keys,
                    require_signature=strict,
                    fsync=True,
                    on_file=lambda rel: self._step("extract:file"),
                )
        except BaseException:
            # a clean failure (disk full, bad file): forget the attempt; only crashes count
            attempts[key] -= 1
            self.state.txn = None
            self._save_state()
            raise
        result = self._apply(txn, dest, m, installed, gate)
        if (
            result.status == "installed"
            and src.suffix == ".tar"
            and src.parent == self.slots.incoming
        ):
            with contextlib.suppress(OSError):
                src.unlink(missing_ok=True)
        return result

    def _revert_to(self, slot: str, m: Manifest, cur: Manifest, reason: str) -> UpdateResult:
        """Switch back to the model already in ``slot`` through the transaction and its hooks
        (no extract: the slot holds a bundle that was installed here before)."""
        txn = Txn(slot, m.name, m.version, self.slots.active(), cur.version, revert=True)
        self.state.txn = txn
        self.slots.write_state(self.state.to_json())  # durable before anything changes
        self._wait_grace()
        result = self._apply(txn, self.slots.path(slot), m, None, None)
        if result.status != "installed":  # the model in use stays: say so
            return UpdateResult(
                "failed",
                result.version,
                m.version,
                cur.version,
                cur.name,
                f"cannot go back to version {m.version}: {result.reason}",
            )
        return UpdateResult("rolled-back", m.version, None, cur.version, cur.name, reason)

    def _apply(
        self,
        txn: Txn,
        dest: Path,
        m: Manifest,
        installed: Manifest | None,
        gate: Gate | None,
    ) -> UpdateResult:
        """Check the extracted slot, switch to it (the commit point), finish or switch back."""
        try:
            if not (txn.local or txn.revert) and installed is not None:
                m = self._head_policy(dest, m, installed)
            self._step("before_install")
            self._hook("before_install", self._ctx("before_install", txn, dest))
            self._step("health")
            report = check_health(dest, self.config.latency_budget_ms, self.config.require_golden)
            if not report.ok:
                raise _Rollback(f"health check failed: {report.reason}")
            if gate is not None:
                try:
                    gate(dest, m)
                except (UpdateError, BundleError) as exc:
                    raise _Rollback(exc.message) from None
            self._step("switch")
        except _Rollback as exc:
            return self._abandon(txn, exc.reason)
        except OSError as exc:  # the device, not the bundle: may work next time
            return self._abandon(txn, os_reason(exc, switched=False), remember=False)
        try:
            self.slots.switch(txn.slot, step=self._step)
        except OSError as exc:
            if self.slots.active() != txn.slot:  # the rename did not happen
                reason = f"switching to the new model failed: {os_reason(exc, switched=False)}"
                return self._abandon(txn, reason, remember=False)
            # after the rename (e.g. the folder's fsync): the new model is in use
            log.warning("switched to slot %s, but: %s", txn.slot, exc)
        return self._finish(txn)

    def _finish(self, txn: Txn, recheck: bool = False) -> UpdateResult:
        """After the commit point: run ``after_install`` and commit, or switch back.

        ``recheck`` (recovery after a crash) health-checks the slot first.
        """
        dest = self.slots.path(txn.slot)
        self.state.last_switch = time.time()
        try:
            if recheck and not self.healthy(txn.slot):
                raise _Rollback("the new model fails its health check after a restart")
            self._step("after_install")
            self._hook("after_install", self._ctx("after_install", txn, dest))
        except _Rollback as exc:
            return self._undo_switch(txn, exc.reason)
        except OSError as exc:
            return self._undo_switch(txn, f"after_install: {os_reason(exc, switched=True)}")
        self._commit(txn)
        return UpdateResult("installed", txn.version, txn.version, txn.previous_version, txn.name)

    def _head_policy(self, dest: Path, m: Manifest, installed: Manifest) -> Manifest:
        """OTA policy ``keep``: re-apply a head fine-tuned here onto the update's backbone."""
        from .keep import keep_local_head

        try:
            merged = keep_local_head(self.slots, self.trust, self.config, dest, m)
        except (EdgesmithError, OSError, ValueError) as exc:
            log.warning("keeping the local head failed (%s); installing the update's head", exc)
            return m
        return merged or m

    def _copy_bundle(self, src: Path, dest: Path, m: Manifest) -> None:
        """Copy a bundle folder's listed files (only those) into a new slot, durably."""
        tmp = self.slots.slots_dir / f".{dest.name}.copy"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for rel in [MANIFEST, SIGNATURE, *m.files]:
                if (src / rel).is_file():
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src / rel, tmp / rel)
                    with open(tmp / rel, "rb+") as fh:
                        os.fsync(fh.fileno())
            for d in sorted({p for p in tmp.rglob("*") if p.is_dir()} | {tmp}, reverse=True):
                fsync_dir(d)
            tmp.rename(dest)
            fsync_dir(self.slots.slots_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _wait_grace(self) -> None:
        wait = self.state.last_switch + self.config.switch_grace_s - time.time()
        if wait > 0:
            time.sleep(min(wait, self.config.switch_grace_s))

    # ------------------------------------------------------------------ hooks

    def _ctx(self, hook: str, txn: Txn, bundle: Path, reason: str = "") -> HookContext:
        return HookContext(
            hook, bundle, self.slots.current, txn.name, txn.version, txn.previous_version, reason
        )

    def _hook(self, name: str, ctx: HookContext) -> None:
        try:
            run_hook(getattr(self.hooks, name), ctx, self.config.hook_timeout_s)
        except UpdateError as exc:
            raise _Rollback(exc.message) from None

    def _rollback_hook(self, txn: Txn, reason: str) -> None:
        try:
            run_hook(
                self.hooks.on_rollback,
                self._ctx("on_rollback", txn, self.slots.path(txn.slot), reason),
                self.config.hook_timeout_s,
            )
        except UpdateError as exc:
            log.error("on_rollback hook failed: %s", exc.message)

    # ------------------------------------------------------------------ closing a transaction

    def _commit(self, txn: Txn) -> None:
        """Close a transaction whose slot is in use and whose ``after_install`` ran."""
        self.state.attempts.pop(txn.key, None)
        self.state.txn = None
        digest = manifest_digest(self.slots.path(txn.slot))
        self.state.rolled_back = [d for d in self.state.rolled_back if d != digest]
        self.state.history.append(
            {"name": txn.name, "version": txn.version, "slot": txn.slot, "at": iso_utc(utc_now())}
        )
        self.state.history = self.state.history[-HISTORY_KEPT:]
        try:
            self._step("commit")
            self.slots.write_state(self.state.to_json())
            self._unsaved = False
        except OSError as exc:  # the model in use is the new one either way; retried later
            log.error(
                "installed, but cannot save %s (%s); retrying later", self.slots.state_file, exc
            )
            self._unsaved = True

    def _abandon(self, txn: Txn, reason: str, remember: bool = True) -> UpdateResult:
        """Close a failed transaction whose old model is in use; runs ``on_rollback``.

        ``remember``: the bundle itself failed (not the device): never retry it, never recover
        into its slot.
        """
        log.error("update to %s %s rolled back: %s", txn.name, txn.version, reason)
        if remember and not txn.revert:  # a failed revert blames no bundle
            self.state.remember_rolled_back(manifest_digest(self.slots.path(txn.slot)))
            if not txn.local:  # a refused local head must not block that fleet version
                self.state.failed[txn.key] = reason
        self.state.attempts.pop(txn.key, None)
        self.state.txn = None
        self._save_state()
        self._rollback_hook(txn, reason)
        return UpdateResult(
            "rolled-back", txn.previous_version, txn.version, txn.previous_version, txn.name, reason
        )

    def _undo_switch(self, txn: Txn, reason: str) -> UpdateResult:
        """Fail an update after the commit point: point ``current`` back at the previous slot.

        If that is impossible (no previous model) or fails (an OSError), the result says so and
        names the version still in use; a failed switch back is retried at the next check.
        """
        prev = txn.previous_slot
        if self.slots.active() == txn.slot:
            if not prev or not self.slots.path(prev).is_dir():
                self._abandon(txn, reason + "; no previous model to go back to")
                return UpdateResult(
                    "failed",
                    txn.version,
                    txn.version,
                    txn.previous_version,
                    txn.name,
                    f"{reason}; no previous model to go back to, so version {txn.version} "
                    "stays in use",
                )
            txn.undo = reason  # a crash from here on: the next start finishes the rollback
            self.state.txn = txn
            self._save_state()
            try:
                self.slots.switch(prev)
            except OSError as exc:
                if self.slots.active() == txn.slot:
                    log.error("cannot switch back to slot %s: %s; retrying later", prev, exc)
                    return UpdateResult(
                        "failed",
                        txn.version,
                        txn.version,
                        txn.previous_version,
                        txn.name,
                        f"{reason}; switching back failed ({os_reason(exc, switched=True)}), so "
                        f"version {txn.version} stays in use until the next check",
                    )
            self.state.last_switch = time.time()
        return self._abandon(txn, reason)


def os_reason(exc: OSError, switched: bool = False) -> str:
    """An OSError as an update result's reason (a full disk named as such)."""
    if exc.errno == errno.ENOSPC:
        where = exc.filename or "device"
        if switched:
            return f"disk full ({where})"
        return f"disk full while installing ({where}); the installed model is untouched"
    return f"{type(exc).__name__}: {exc}"


def manifest_digest(slot: Path) -> str | None:
    """SHA-256 of a slot's manifest (what ``state.rolled_back`` records), None if unreadable."""
    try:
        return hashlib.sha256((slot / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return None
