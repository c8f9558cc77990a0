"""The update agent: poll (or hear an MQTT announcement), download, verify, health-check, switch.

One update, in order (each step name is also a crash point for the fault tests)::

    check -> download -> verify -> extract -> before_install -> health -> switch -> after_install -> commit

Only the inactive slot is written before ``switch``; ``switch`` is one atomic rename of the
``current`` link. A transaction record in ``state.json`` lets a restarted agent finish or undo
an update that a crash interrupted after the switch. Any failure leaves (or puts back) the old
model and runs ``on_rollback``.

Example:
    >>> agent = Agent(AgentConfig(root="/var/lib/edgesmith", server="https://updates.example.com",
    ...                           trusted_keys=["/etc/edgesmith/release.pub"]))  # doctest: +SKIP
    >>> agent.start(); agent.check_once().status                                 # doctest: +SKIP
    'installed'
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgesmith.errors import BundleError, EdgesmithError, UpdateError
from edgesmith.runtime.bundle import (
    MANIFEST,
    SIGNATURE,
    BundleCheck,
    Manifest,
    extract_bundle,
    fsync_dir,
    verify_bundle,
)

from .channel import CHANNEL_FILE, Channel, Release, in_rollout, iso_utc, open_channel, utc_now
from .config import AgentConfig, UpdateResult
from .download import download, fetch, post_json
from .health import check_health
from .hooks import HookContext, Hooks, run_hook
from .slots import Slots

__all__ = ["STEPS", "Agent", "AgentConfig", "UpdateResult"]

log = logging.getLogger(__name__)

STEPS = (
    "check",
    "download",
    "download:half",
    "verify",
    "extract",
    "extract:file",
    "before_install",
    "health",
    "switch",
    "switch:linked",
    "switch:renamed",
    "after_install",
    "commit",
)


class _Rollback(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Agent:
    """The update agent for one device root. Use :meth:`run` as a daemon, or call
    :meth:`check_once` / :meth:`install` from a device app (they :meth:`start` it on first use;
    :meth:`close` releases the root)."""

    def __init__(
        self,
        config: AgentConfig,
        hooks: Hooks | None = None,
        step_hook: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.slots = Slots(config.root)
        py = hooks or Hooks()
        self.hooks = Hooks(
            before_install=py.before_install or config.before_install,
            after_install=py.after_install or config.after_install,
            on_rollback=py.on_rollback or config.on_rollback,
        )
        self._step_hook = step_hook
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._mqtt: Any = None
        self._trusted: dict[str, bytes] | None = None
        self._device_key: Any = None  # signs heads fine-tuned here (config.device_key)
        self._device: dict[str, bytes] = {}  # its public key: trusted for head-only bundles
        self.state: dict[str, Any] = {}
        self.profile: Any = None
        self.device_id = ""
        self.last_result: UpdateResult | None = None
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def current_path(self) -> Path:
        """The ``current`` link: give it to ``edgesmith.runtime.load`` or ``edgesmith serve --watch``."""
        return self.slots.current

    def start(self) -> None:
        """Lock the root, load state, recover from an interrupted update, connect MQTT.

        Raises:
            EdgesmithError: another agent holds the root, bad keys, unknown target.
        """
        from edgesmith.devices.profiles import load_profile

        if self._started:
            return
        self.slots.lock()
        try:
            self.slots.prepare()
            self.state = self.slots.read_state()
            self.device_id = self._device_id()
            self.profile = load_profile(self.config.target or self._detect_target())
            if self.config.trusted_keys:
                from edgesmith.runtime.signing import load_trusted_keys

                self._trusted = load_trusted_keys(self.config.trusted_keys)
            elif self.config.require_signature or self.config.server:
                raise EdgesmithError(
                    "no trusted public key configured",
                    hint="give the publisher's NAME.pub with --key (or trusted_keys in agent.yaml)",
                )
            if self.config.device_key:
                from .local import load_device_key

                self._device_key, self._device = load_device_key(self.config.device_key)
            self._recover()
            if self.config.mqtt:
                from .mqtt import MqttLink

                self._mqtt = MqttLink(
                    self.config.mqtt,
                    f"edgesmith-{self.device_id}",
                    self.config.channel,
                    self._announced,
                )
                self._mqtt.start(wait_s=3.0)
        except BaseException:
            self.slots.unlock()
            raise
        self._started = True

    def close(self) -> None:
        """Disconnect MQTT and release the root's lock."""
        if self._mqtt is not None:
            self._mqtt.stop()
            self._mqtt = None
        self.slots.unlock()
        self._started = False

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current check (thread-safe)."""
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        """Check now instead of at the next poll (thread-safe)."""
        self._wake.set()

    def run(self, once: bool = False) -> UpdateResult | None:
        """The daemon loop: check, then wait for the poll interval or an announcement."""
        self.start()
        try:
            while not self._stop.is_set():
                self._wake.clear()
                self.check_once()
                if once:
                    break
                self._wake.wait(self.config.poll_interval_s * random.uniform(0.9, 1.1))
        finally:
            self.close()
        return self.last_result

    def _announced(self, seq: int) -> None:
        if seq > int(self.state.get("channel_seq", 0)):
            self._wake.set()

    def _device_id(self) -> str:
        if self.config.device_id:
            return self.config.device_id
        if self.state.get("device_id"):
            return str(self.state["device_id"])
        try:
            mid = Path("/etc/machine-id").read_text().strip()
            # never publish the machine id itself (machine-id(5)); hash it with a fixed salt
            did = hashlib.sha256(f"edgesmith:{mid}".encode()).hexdigest()[:16] if mid else ""
        except OSError:
            did = ""
        did = did or uuid.uuid4().hex[:16]
        self.state["device_id"] = did
        self.slots.write_state(self.state)
        return did

    def _detect_target(self) -> str:
        from edgesmith.devices.detect import detect

        found = detect().profile
        if found is None:
            raise EdgesmithError(
                "cannot tell which device profile this is",
                hint="pass --target (see `edgesmith devices list`)",
            )
        return found

    def _step(self, name: str) -> None:
        if self._step_hook is not None:
            self._step_hook(name)

    # ------------------------------------------------------------------ what is installed

    def installed(self) -> Manifest | None:
        """The manifest of the model in use (cheap: files are not re-hashed)."""
        if self.slots.active() is None:
            return None
        try:
            return verify_bundle(self.slots.current, check_files=False).manifest
        except BundleError:
            return None

    def status(self) -> dict[str, Any]:
        m = self.installed()
        return {
            "device_id": self.device_id,
            "channel": self.config.channel,
            "target": self.profile.name if self.profile else self.config.target,
            "slot": self.slots.active(),
            "name": m.name if m else None,
            "version": m.version if m else None,
            "channel_seq": self.state.get("channel_seq"),
            "failed": self.state.get("failed", {}),
        }

    def _slot_ok(self, slot: str) -> bool:
        try:
            self._verify(self.slots.path(slot))
        except (BundleError, OSError):
            return False
        return check_health(
            self.slots.path(slot), self.config.latency_budget_ms, self.config.require_golden
        ).ok

    # ------------------------------------------------------------------ keys (fleet and device)

    def _bundle_keys(self) -> dict[str, bytes] | None:
        if self._trusted is None and not self._device:
            return None
        return {**(self._trusted or {}), **self._device}

    def _verify(self, path: Path, local: bool = False) -> BundleCheck:
        """Verify a bundle's signature and files. A fleet key vouches for anything; the device's
        own key only for a head fine-tuned here on a model the fleet published (and a ``local``
        install must be such a bundle whoever signed it)."""
        check = verify_bundle(
            path, trusted_keys=self._bundle_keys(), require_signature=self.config.require_signature
        )
        signer = check.signed_by
        by_device = (
            signer is not None and signer in self._device and signer not in (self._trusted or {})
        )
        if by_device or local:
            from .local import check_local_bundle

            check_local_bundle(check.manifest, self.state.get("fleet_models", {}))
        else:  # the fleet (or, without signatures, the operator) vouches for this model
            from edgesmith.runtime.head import backbone_fingerprint

            known = self.state.setdefault("fleet_models", {})
            fp = backbone_fingerprint(check.manifest)
            if fp not in known:
                known[fp] = f"{check.manifest.name}:{check.manifest.version}"
                for old in list(known)[:-8]:  # the last few are enough: slots hold two
                    del known[old]
        return check

    def _fleet_version(self, m: Manifest | None) -> int | None:
        """The fleet version a bundle derives from: a head fine-tuned here keeps its base's."""
        if m is None:
            return None
        trained = (m.trainable_head or {}).get("trained", {})
        if trained.get("by") == "device" and isinstance(trained.get("base_version"), int):
            return int(trained["base_version"])
        return m.version

    # ------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        txn = self.state.get("txn")
        if txn:
            if self.slots.active() == txn["slot"]:
                log.warning(
                    "finishing the update to version %s that a crash interrupted", txn["version"]
                )
                self._finish_switched(txn)
            else:
                log.warning(
                    "discarding an update to version %s that a crash interrupted", txn["version"]
                )
                self.state.pop("txn", None)
                self.slots.write_state(self.state)
        active = self.slots.active()
        if active is None or self._slot_ok(active):
            return  # (no model yet: a first install that never switched stays uninstalled)
        other = "b" if active == "a" else "a"
        if self.slots.path(other).is_dir() and self._slot_ok(other):
            log.error(
                "the model in use (slot %s) is broken; switching back to slot %s", active, other
            )
            self.slots.switch(other)
        else:
            log.error("no working model on this device: both slots fail verification")

    def _finish_switched(self, txn: dict[str, Any]) -> None:
        ctx = self._ctx("after_install", txn, self.slots.path(txn["slot"]))
        try:
            if not self._slot_ok(txn["slot"]):
                raise _Rollback("the new model fails its health check after a restart")
            self._hook("after_install", ctx)
            self._commit(txn)
        except _Rollback as exc:
            self._undo_switch(txn, exc.reason)

    # ------------------------------------------------------------------ checking

    def _fetch_channel(self) -> Channel:
        if not self.config.server:
            raise EdgesmithError("no update server configured", hint="pass --server URL")
        url = f"{self.config.server.rstrip('/')}/{self.config.channel}/{CHANNEL_FILE}"
        data = fetch(url, 1 << 20, self.config.timeout_s)
        channel = open_channel(data, self._trusted or {}, url, expect=self.config.channel)
        seen = int(self.state.get("channel_seq", 0))
        if channel.seq < seen:
            raise UpdateError(
                f"{url} has seq {channel.seq}, older than the {seen} this device saw before: "
                "a replayed channel file",
                hint="an old channel file is being replayed (or the store was restored from a backup)",
            )
        if channel.seq > seen:
            self.state["channel_seq"] = channel.seq
            self.slots.write_state(self.state)
        return channel

    def _pick(self, channel: Channel) -> Release | None:
        offers = [r for r in channel.releases if self.profile.runs_bundles_for(r.target)]
        if self.config.name:
            offers = [r for r in offers if r.name == self.config.name]
        else:
            m = self.installed()
            if m is not None and any(r.name == m.name for r in offers):
                offers = [r for r in offers if r.name == m.name]
        if not offers:
            return None
        if len({r.name for r in offers}) > 1:
            raise UpdateError(
                f"channel '{channel.channel}' offers several models for {self.profile.name}: "
                + ", ".join(sorted({r.name for r in offers})),
                hint="set the model to follow (--name or 'name' in agent.yaml)",
            )
        # the device's own target first, then the most recent version
        return max(offers, key=lambda r: (r.target == self.profile.name, r.version))

    def check_once(self) -> UpdateResult:
        """Fetch the channel and install what it offers this device, if anything.

        Never raises for update problems: they come back as a ``failed``/``rolled-back`` result
        (also written to ``status.json`` and reported).
        """
        self.start()
        t0 = time.perf_counter()
        installed = self.installed()
        cur = installed.version if installed else None
        base = self._fleet_version(installed)  # a head fine-tuned here keeps its fleet version
        release = None
        try:
            self._step("check")
            channel = self._fetch_channel()
            release = self._pick(channel)
            if release is None:
                result = UpdateResult("up-to-date", cur, name=installed.name if installed else None)
                self._clean_incoming(keep=None)
            elif installed and installed.name == release.name and release.version == base:
                result = UpdateResult("up-to-date", cur, release.version, name=release.name)
                self._clean_incoming(keep=None)
            elif installed and installed.name == release.name and release.version < (base or 0):
                raise UpdateError(
                    f"channel offers {release.name} version {release.version}, older than the "
                    f"installed {base}: no downgrade",
                    hint="to undo a release, publish a new, higher version",
                )
            elif self._failed_before(release.name, release.version):
                reason = self.state["failed"][f"{release.name}:{release.version}"]
                result = UpdateResult(
                    "skipped",
                    cur,
                    release.version,
                    name=release.name,
                    reason=f"failed here before: {reason}",
                )
            elif not in_rollout(self.device_id, release):
                result = UpdateResult(
                    "not-in-rollout",
                    cur,
                    release.version,
                    name=release.name,
                    reason=f"rollout at {release.rollout:g}%",
                )
            else:
                tar = self._download(release)
                result = self._install(tar, release)
        except (UpdateError, BundleError, EdgesmithError) as exc:
            result = UpdateResult(
                "failed",
                cur,
                release.version if release else None,
                name=release.name if release else None,
                reason=exc.message,
            )
        except OSError as exc:
            result = UpdateResult(
                "failed",
                cur,
                release.version if release else None,
                name=release.name if release else None,
                reason=_os_reason(exc),
            )
            self._clean_incoming(keep=None)
        # a complete download that did not install is not kept (only .part files, for resume)
        for tar in self.slots.incoming.glob("*.tar"):
            tar.unlink(missing_ok=True)
        return self._report(result, t0)

    def install(self, bundle: str | Path) -> UpdateResult:
        """Install a local bundle (folder or ``.tar``) through the same checks: provisioning.

        Never raises for update problems (see :meth:`check_once`).
        """
        self.start()
        t0 = time.perf_counter()
        m = self.installed()
        try:
            result = self._install(Path(bundle), None)
        except (UpdateError, BundleError, EdgesmithError) as exc:
            result = UpdateResult("failed", m.version if m else None, reason=exc.message)
        except OSError as exc:
            result = UpdateResult("failed", m.version if m else None, reason=_os_reason(exc))
        return self._report(result, t0)

    def install_local(
        self, bundle: str | Path, gate: Callable[[Path, Manifest], None] | None = None
    ) -> UpdateResult:
        """Install a bundle made on this device (a fine-tuned head) through the same A/B switch.

        The bundle must change nothing but the head of the installed model (same model files).
        ``gate(slot_path, manifest)`` runs after the health check, before the switch; raising
        :class:`UpdateError` there refuses the bundle (``rolled-back``, the old model stays).
        Refusals are not remembered as failed fleet versions. See
        :func:`edgesmith.devices.ota.local.activate`.
        """
        self.start()
        t0 = time.perf_counter()
        m = self.installed()
        try:
            result = self._install(Path(bundle), None, local=True, gate=gate)
        except (UpdateError, BundleError, EdgesmithError) as exc:
            result = UpdateResult("failed", m.version if m else None, reason=exc.message)
        except OSError as exc:
            result = UpdateResult("failed", m.version if m else None, reason=_os_reason(exc))
        return self._report(result, t0)

    def _failed_before(self, name: str, version: int) -> bool:
        return f"{name}:{version}" in self.state.get("failed", {})

    # ------------------------------------------------------------------ download

    def _clean_incoming(self, keep: str | None) -> None:
        for p in self.slots.incoming.glob("*"):
            if keep is None or not p.name.startswith(keep):
                p.unlink(missing_ok=True)

    def _download(self, r: Release) -> Path:
        if r.size > self.config.max_bundle_bytes:
            raise UpdateError(
                f"{r.name} version {r.version} is {r.size} bytes, over this device's limit of "
                f"{self.config.max_bundle_bytes}",
                hint="raise max_bundle_bytes in agent.yaml, or publish a smaller model",
            )
        self._clean_incoming(keep=r.sha256)
        part = self.slots.incoming / f"{r.sha256}.part"
        final = part.with_suffix(".tar")
        if final.exists():
            return final  # downloaded before a restart; verified again below
        have = part.stat().st_size if part.exists() else 0
        inactive = self.slots.path(self.slots.inactive())
        reclaim = (
            sum(f.stat().st_size for f in inactive.rglob("*") if f.is_file())
            if inactive.is_dir()
            else 0
        )
        st = os.statvfs(self.slots.root)
        free = st.f_bavail * st.f_frsize
        need = 2 * r.size - have - reclaim + (1 << 20)
        if need > free:
            raise UpdateError(
                f"not enough disk space for {r.name} version {r.version}: need {need >> 20} MiB more, "
                f"{free >> 20} MiB free on {self.slots.root}",
                hint="free space on the device, or publish a smaller model",
            )
        self._step("download")
        half = [False]

        def progress(n: int) -> None:
            if not half[0] and n >= r.size // 2:
                half[0] = True
                self._step("download:half")

        url = f"{self.config.server.rstrip('/')}/{r.path}" if self.config.server else r.path
        return download(
            url,
            part,
            r.size,
            r.sha256,
            retries=self.config.download_retries,
            backoff_s=self.config.retry_backoff_s,
            timeout=self.config.timeout_s,
            on_bytes=progress,
        )

    # ------------------------------------------------------------------ install

    def _check_manifest(self, m: Manifest, expect: Release | None, local: bool = False) -> None:
        installed = self.installed()
        if expect is not None and (m.name, m.version, m.target) != (
            expect.name,
            expect.version,
            expect.target,
        ):
            raise UpdateError(
                f"the bundle is {m.name} {m.version} for {m.target}, but the channel announced "
                f"{expect.name} {expect.version} for {expect.target}",
                hint="the store is inconsistent; republish the release",
            )
        if not self.profile.runs_bundles_for(m.target):
            from edgesmith.devices.profiles import list_profiles, load_profile

            arch = load_profile(m.target).arch if m.target in list_profiles() else "unknown arch"
            raise UpdateError(
                f"the bundle is built for target '{m.target}' ({arch}); this device is "
                f"'{self.profile.name}' ({self.profile.arch})",
                hint=f"build for this device: edgesmith build RECIPE --target {self.profile.name}",
            )
        if m.expired():
            raise UpdateError(
                f"{m.name} version {m.version} expired at {m.expires}", hint="publish a fresh build"
            )
        # a fleet bundle must be newer than the fleet version the installed one derives from; a
        # local one (a head fine-tuned here) newer than the installed bundle itself
        floor = installed.version if local and installed else self._fleet_version(installed)
        if installed is not None and installed.name == m.name and m.version <= (floor or 0):
            raise UpdateError(
                f"{m.name} version {m.version} is not newer than the installed version {floor}: "
                "no downgrade or replay",
                hint="publish a higher version",
            )
        if local and (installed is None or installed.name != m.name):
            raise UpdateError(
                f"a fine-tuned {m.name} can only replace an installed {m.name}",
                hint="fine-tune the installed model (ROOT/current)",
            )
        if installed is not None and installed.name != m.name and self.config.name != m.name:
            raise UpdateError(
                f"this device runs '{installed.name}'; the bundle is '{m.name}'",
                hint=f"to switch models, set the agent's name to '{m.name}'",
            )
        if not local and self._failed_before(m.name, m.version):
            raise UpdateError(
                f"{m.name} version {m.version} failed on this device before: "
                + self.state["failed"][f"{m.name}:{m.version}"],
                hint="publish a fixed, higher version",
            )

    def _install(
        self,
        src: Path,
        expect: Release | None,
        local: bool = False,
        gate: Callable[[Path, Manifest], None] | None = None,
    ) -> UpdateResult:
        keys, strict = self._bundle_keys(), self.config.require_signature
        self._step("verify")
        m = self._verify(src, local=local).manifest
        self._check_manifest(m, expect, local=local)
        installed = self.installed()
        key = f"{m.name}:{m.version}"
        attempts = self.state.setdefault("attempts", {})
        attempts[key] = int(attempts.get(key, 0)) + 1
        if attempts[key] > self.config.max_attempts:
            self._mark_failed(m.name, m.version, f"install interrupted {attempts[key] - 1} times")
            raise UpdateError(
                f"{m.name} version {m.version}: install interrupted {attempts[key] - 1} times; giving up",
                hint="check the device's logs (out of memory? power?) and publish a fixed version",
            )
        slot = self.slots.inactive()
        txn = {
            "slot": slot,
            "name": m.name,
            "version": m.version,
            "previous_slot": self.slots.active(),
            "previous_version": installed.version if installed else None,
        }
        if local:
            txn["local"] = True
        self.state["txn"] = txn
        self.slots.write_state(self.state)
        dest = self.slots.path(slot)
        try:
            self._wait_grace()
            self._step("extract")
            self.slots.clear(slot)
            if src.is_dir():
                self._copy_bundle(src, dest, m)
                self._verify(dest, local=local)
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
            self.state.pop("txn", None)
            with contextlib.suppress(OSError):
                self.slots.write_state(self.state)
            raise
        ctx = self._ctx("before_install", txn, dest)
        try:
            if not local and installed is not None:
                m = self._head_policy(dest, m, installed)
            self._step("before_install")
            self._hook("before_install", ctx)
            self._step("health")
            report = check_health(dest, self.config.latency_budget_ms, self.config.require_golden)
            if not report.ok:
                raise _Rollback(f"health check failed: {report.reason}")
            if gate is not None:
                try:
                    gate(dest, m)
                except (UpdateError, BundleError) as exc:
                    raise _Rollback(exc.message) from None
        except _Rollback as exc:
            return self._abandon(txn, exc.reason)
        self._step("switch")
        self.slots.switch(slot, step=self._step)
        self.state["last_switch"] = time.time()
        self.slots.write_state(self.state)
        try:
            self._step("after_install")
            self._hook("after_install", self._ctx("after_install", txn, dest))
        except _Rollback as exc:
            return self._undo_switch(txn, exc.reason)
        self._step("commit")
        self._commit(txn)
        if src.suffix == ".tar" and src.parent == self.slots.incoming:
            src.unlink(missing_ok=True)
        return UpdateResult("installed", m.version, m.version, txn["previous_version"], m.name)

    def _head_policy(self, dest: Path, m: Manifest, installed: Manifest) -> Manifest:
        """OTA policy ``keep``: re-apply a head fine-tuned here onto the update's backbone."""
        from .local import keep_local_head

        try:
            merged = keep_local_head(self, dest, m)
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
        wait = float(self.state.get("last_switch", 0)) + self.config.switch_grace_s - time.time()
        if wait > 0:
            time.sleep(min(wait, self.config.switch_grace_s))

    def _ctx(self, hook: str, txn: dict[str, Any], bundle: Path, reason: str = "") -> HookContext:
        return HookContext(
            hook,
            bundle,
            self.slots.current,
            txn["name"],
            txn["version"],
            txn["previous_version"],
            reason,
        )

    def _hook(self, name: str, ctx: HookContext) -> None:
        try:
            run_hook(getattr(self.hooks, name), ctx, self.config.hook_timeout_s)
        except UpdateError as exc:
            raise _Rollback(exc.message) from None

    def _mark_failed(self, name: str, version: int, reason: str, local: bool = False) -> None:
        if not local:  # a refused local head must not block the fleet version of that number
            self.state.setdefault("failed", {})[f"{name}:{version}"] = reason
        self.state.get("attempts", {}).pop(f"{name}:{version}", None)
        self.state.pop("txn", None)
        self.slots.write_state(self.state)

    def _commit(self, txn: dict[str, Any]) -> None:
        self.state.get("attempts", {}).pop(f"{txn['name']}:{txn['version']}", None)
        self.state.pop("txn", None)
        self.state.setdefault("history", []).append(
            {
                "name": txn["name"],
                "version": txn["version"],
                "slot": txn["slot"],
                "at": iso_utc(utc_now()),
            }
        )
        self.state["history"] = self.state["history"][-20:]
        self.slots.write_state(self.state)

    def _rollback_hook(self, txn: dict[str, Any], reason: str) -> None:
        try:
            run_hook(
                self.hooks.on_rollback,
                self._ctx("on_rollback", txn, self.slots.path(txn["slot"]), reason),
                self.config.hook_timeout_s,
            )
        except UpdateError as exc:
            log.error("on_rollback hook failed: %s", exc.message)

    def _abandon(self, txn: dict[str, Any], reason: str) -> UpdateResult:
        """Fail an update before the switch: the old model never stopped being current."""
        log.error("update to %s %s rolled back: %s", txn["name"], txn["version"], reason)
        self._mark_failed(txn["name"], txn["version"], reason, local=bool(txn.get("local")))
        self._rollback_hook(txn, reason)
        return UpdateResult(
            "rolled-back",
            txn["previous_version"],
            txn["version"],
            txn["previous_version"],
            txn["name"],
            reason,
        )

    def _undo_switch(self, txn: dict[str, Any], reason: str) -> UpdateResult:
        """Fail an update after the switch: point ``current`` back at the previous slot."""
        prev = txn.get("previous_slot")
        if prev and self.slots.path(prev).is_dir():
            self.slots.switch(prev)
            self.state["last_switch"] = time.time()
        else:
            reason += "; no previous model to go back to"
        return self._abandon(txn, reason)

    # ------------------------------------------------------------------ reporting

    def _report(self, result: UpdateResult, t0: float) -> UpdateResult:
        result.seconds = round(time.perf_counter() - t0, 3)
        self.last_result = result
        level = logging.INFO if result.ok else logging.ERROR
        log.log(
            level,
            "update check: %s%s",
            result.status,
            f" ({result.reason})" if result.reason else "",
        )
        status = {**self.status(), **result.to_json(), "time": iso_utc(utc_now())}
        try:
            self.slots.write_status(status)
        except OSError as exc:
            log.error("cannot write %s: %s", self.slots.status_file, exc)
        if self._mqtt is not None:
            self._mqtt.publish_status(self.device_id, status)
        if self.config.report_url:
            try:
                post_json(
                    self.config.report_url, json.dumps(status).encode(), self.config.timeout_s
                )
            except (OSError, ValueError) as exc:
                log.warning("status report to %s failed: %s", self.config.report_url, exc)
        return result


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"disk full while installing ({exc.filename or 'device'}); the installed model is untouched"
    return f"{type(exc).__name__}: {exc}"
