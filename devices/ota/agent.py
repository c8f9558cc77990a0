"""The update agent: poll (or hear an MQTT announcement), download, verify, health-check, switch.

One update, in order (each step name is also a crash point for the fault tests)::

    check -> download -> verify -> extract -> before_install -> health -> switch -> after_install -> commit

Every update is a transaction recorded in ``state.json`` before the inactive slot is touched.
Its commit point is the ``rename(2)`` of the ``current`` link in ``switch``: before it, any
failure (an error, an ``OSError`` such as a full disk) leaves the old model in use and closes the
transaction; after it, the agent finishes (``after_install``, commit) or switches back in the
same run, and reports what ``current`` then points at. Only a crash leaves the transaction open:
the next start (or, if switching back itself failed, the next check) settles it.

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
from .config import AgentConfig, UpdateResult, printable
from .download import Deadline, download, fetch, post_json
from .health import check_health
from .hooks import HookContext, Hooks, run_hook
from .slots import Slots
from .state import channel_seq, clean_state, remember_rolled_back

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
        self._unsaved = False  # state.json is behind self.state (a write failed; retried)
        self._check_now = False  # wake() was called
        self._announced_seq = 0  # the highest seq announced over MQTT
        self._deadline: Deadline | None = None  # the network deadline of the check under way

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
        from edgesmith.runtime.profiles import load_profile

        if self._started:
            return
        try:
            self.slots.lock()
        except OSError as exc:
            raise _root_error(self.config.root, exc) from None
        try:
            try:
                self.slots.prepare()
                raw = self.slots.read_state()
            except OSError as exc:
                raise _root_error(self.config.root, exc) from None
            self.state = clean_state(raw, self.config.channel, self.slots.status_file)
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
        self._check_now = True
        self._wake.set()

    def run(self, once: bool = False) -> UpdateResult | None:
        """The daemon loop: check, then wait for the poll interval or an announcement.

        Announcements are coalesced: one that names a seq this device has already seen (it
        arrived during a check that fetched it) is dropped, and a check the others trigger starts
        at least ``announce_min_interval_s`` after the previous one (a storm of forged
        announcements costs one channel fetch per interval, never an install).
        """
        self.start()
        try:
            while not self._stop.is_set():
                self._wake.clear()
                self._check_now = False
                started = time.monotonic()
                self.check_once()
                if once:
                    break
                self._wait(started, time.monotonic() + self._poll_interval())
        finally:
            self.close()
        return self.last_result

    def _poll_interval(self) -> float:
        return self.config.poll_interval_s * random.uniform(0.9, 1.1)

    def _wait(self, started: float, poll_at: float) -> None:
        """Until the next poll, a :meth:`wake`, or an announcement of something new."""
        while not self._stop.is_set():
            if not self._wake.wait(max(poll_at - time.monotonic(), 0.0)):
                return  # the timed poll
            self._wake.clear()
            if self._stop.is_set() or self._check_now:
                return
            if self._announced_seq > channel_seq(self.state, self.config.channel):
                rest = started + self.config.announce_min_interval_s - time.monotonic()
                if rest > 0:
                    self._stop.wait(rest)
                return

    def _announced(self, seq: int) -> None:
        # called from paho's network thread: never raise there
        if seq > channel_seq(self.state, self.config.channel):
            self._announced_seq = max(self._announced_seq, seq)
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
        self._save_state()
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
            "channel_seq": channel_seq(self.state, self.config.channel) or None,
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
            from edgesmith.runtime.finetune.head import backbone_fingerprint

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
        """At start: settle an open transaction, then make sure the model in use verifies."""
        self._settle()
        active = self.slots.active()
        if active is None or self._slot_ok(active):
            return  # (no model yet: a first install that never switched stays uninstalled)
        other = "b" if active == "a" else "a"
        if self._may_recover_into(other) and self._slot_ok(other):
            log.error(
                "the model in use (slot %s) is broken; switching back to slot %s", active, other
            )
            try:
                self.slots.switch(other)
            except OSError as exc:
                log.error("cannot switch to slot %s: %s", other, exc)
                return
            self.state["last_switch"] = time.time()
            self._save_state()
        else:
            log.error("no working model on this device: the other slot is empty, broken or refused")

    def _may_recover_into(self, slot: str) -> bool:
        """Whether recovery may switch to ``slot``: never to a version rolled back here."""
        path = self.slots.path(slot)
        if not path.is_dir():
            return False
        if _manifest_digest(path) in self.state.get("rolled_back", []):
            log.error("slot %s holds a bundle that was rolled back here; not switching to it", slot)
            return False
        try:
            m = verify_bundle(path, check_files=False).manifest
        except BundleError:
            return False
        if self._failed_before(m.name, m.version) and not _is_local_head(m):
            log.error("slot %s holds %s %s, which failed here before", slot, m.name, m.version)
            return False
        return True

    def _settle(self) -> None:
        """Close what an earlier run left open: a transaction (a crash, or a rollback that could
        not switch back) and a state that could not be saved."""
        txn = self.state.get("txn")
        if not txn:
            if self._unsaved:
                self._save_state()
            return
        if txn.get("undo"):
            log.warning("finishing the rollback of the update to version %s", txn["version"])
            self._undo_switch(txn, txn["undo"])
        elif self.slots.active() == txn["slot"]:
            log.warning(
                "finishing the update to version %s that a crash interrupted", txn["version"]
            )
            self._finish(txn, recheck=True)
        else:
            log.warning(
                "discarding an update to version %s that a crash interrupted", txn["version"]
            )
            self.state.pop("txn", None)
            self._save_state()

    # ------------------------------------------------------------------ checking

    def _fetch_channel(self) -> Channel:
        if not self.config.server:
            raise EdgesmithError("no update server configured", hint="pass --server URL")
        url = f"{self.config.server.rstrip('/')}/{self.config.channel}/{CHANNEL_FILE}"
        data = fetch(url, 1 << 20, self.config.timeout_s, deadline=self._deadline)
        channel = open_channel(data, self._trusted or {}, url, expect=self.config.channel)
        seen = channel_seq(self.state, self.config.channel)  # per channel: moving is no replay
        if channel.seq < seen:
            raise UpdateError(
                f"{url} has seq {channel.seq}, older than the {seen} this device saw before: "
                "a replayed channel file",
                hint="an old channel file is being replayed (or the store was restored from a backup)",
            )
        if channel.seq > seen:
            self.state.setdefault("channel_seqs", {})[self.config.channel] = channel.seq
            self._save_state()
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
        try:
            self._settle()  # e.g. a switch back that failed in the last check
        except Exception:  # reported through the check below; never ends the daemon
            log.exception("settling the last transaction failed")
        installed = self.installed()
        cur = installed.version if installed else None
        base = self._fleet_version(installed)  # a head fine-tuned here keeps its fleet version
        release = None
        self._deadline = Deadline(self.config.check_deadline_s, "update check")
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
            with contextlib.suppress(OSError):
                self._clean_incoming(keep=None)
        except Exception as exc:  # a bug must not end the daemon; report it
            log.exception("update check failed")
            result = UpdateResult(
                "failed",
                cur,
                release.version if release else None,
                name=release.name if release else None,
                reason=f"internal error: {type(exc).__name__}: {exc}",
            )
        finally:
            self._deadline = None
        # a complete download that did not install is not kept (only .part files, for resume)
        with contextlib.suppress(OSError):
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
        deadline = Deadline(self.config.download_deadline_s, "download")
        if self._deadline is not None and self._deadline.remaining() < deadline.remaining():
            deadline = self._deadline
        return download(
            url,
            part,
            r.size,
            r.sha256,
            retries=self.config.download_retries,
            backoff_s=self.config.retry_backoff_s,
            timeout=self.config.timeout_s,
            on_bytes=progress,
            deadline=deadline,
            min_rate=self.config.min_download_rate,
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
                f"the bundle is {m.name} {m.version} for {printable(m.target)}, but the channel announced "
                f"{expect.name} {expect.version} for {expect.target}",
                hint="the store is inconsistent; republish the release",
            )
        if not self.profile.runs_bundles_for(m.target):
            from edgesmith.runtime.profiles import list_profiles, load_profile

            arch = load_profile(m.target).arch if m.target in list_profiles() else "unknown arch"
            raise UpdateError(
                f"the bundle is built for target '{printable(m.target)}' ({arch}); this device is "
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
        dest = self.slots.path(slot)
        try:
            self.state["txn"] = txn
            self.slots.write_state(self.state)  # durable before the slot is touched
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

    def _apply(
        self,
        txn: dict[str, Any],
        dest: Path,
        m: Manifest,
        installed: Manifest | None,
        gate: Callable[[Path, Manifest], None] | None,
    ) -> UpdateResult:
        """Check the extracted slot, switch to it (the commit point), finish or switch back."""
        try:
            if not txn.get("local") and installed is not None:
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
            return self._abandon(txn, _os_reason(exc, switched=False), remember=False)
        try:
            self.slots.switch(txn["slot"], step=self._step)
        except OSError as exc:
            if self.slots.active() != txn["slot"]:  # the rename did not happen
                reason = f"switching to the new model failed: {_os_reason(exc, switched=False)}"
                return self._abandon(txn, reason, remember=False)
            # after the rename (e.g. the folder's fsync): the new model is in use
            log.warning("switched to slot %s, but: %s", txn["slot"], exc)
        return self._finish(txn)

    def _finish(self, txn: dict[str, Any], recheck: bool = False) -> UpdateResult:
        """After the commit point: run ``after_install`` and commit, or switch back.

        ``recheck`` (recovery after a crash) health-checks the slot first.
        """
        dest = self.slots.path(txn["slot"])
        self.state["last_switch"] = time.time()
        try:
            if recheck and not self._slot_ok(txn["slot"]):
                raise _Rollback("the new model fails its health check after a restart")
            self._step("after_install")
            self._hook("after_install", self._ctx("after_install", txn, dest))
        except _Rollback as exc:
            return self._undo_switch(txn, exc.reason)
        except OSError as exc:
            return self._undo_switch(txn, f"after_install: {_os_reason(exc, switched=True)}")
        self._commit(txn)
        return UpdateResult(
            "installed", txn["version"], txn["version"], txn["previous_version"], txn["name"]
        )

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

    def _save_state(self) -> bool:
        """Write ``state.json``; on an OSError log it and retry at the next check."""
        try:
            self.slots.write_state(self.state)
        except OSError as exc:
            log.error("cannot save %s (%s); retrying later", self.slots.state_file, exc)
            self._unsaved = True
            return False
        self._unsaved = False
        return True

    def _mark_failed(self, name: str, version: int, reason: str, local: bool = False) -> None:
        if not local:  # a refused local head must not block the fleet version of that number
            self.state.setdefault("failed", {})[f"{name}:{version}"] = reason
        self.state.get("attempts", {}).pop(f"{name}:{version}", None)
        self.state.pop("txn", None)
        self._save_state()

    def _commit(self, txn: dict[str, Any]) -> None:
        """Close a transaction whose slot is in use and whose ``after_install`` ran."""
        self.state.get("attempts", {}).pop(f"{txn['name']}:{txn['version']}", None)
        self.state.pop("txn", None)
        digest = _manifest_digest(self.slots.path(txn["slot"]))
        self.state["rolled_back"] = [d for d in self.state.get("rolled_back", []) if d != digest]
        self.state.setdefault("history", []).append(
            {
                "name": txn["name"],
                "version": txn["version"],
                "slot": txn["slot"],
                "at": iso_utc(utc_now()),
            }
        )
        self.state["history"] = self.state["history"][-20:]
        try:
            self._step("commit")
            self.slots.write_state(self.state)
            self._unsaved = False
        except OSError as exc:  # the model in use is the new one either way; retried later
            log.error(
                "installed, but cannot save %s (%s); retrying later", self.slots.state_file, exc
            )
            self._unsaved = True

    def _rollback_hook(self, txn: dict[str, Any], reason: str) -> None:
        try:
            run_hook(
                self.hooks.on_rollback,
                self._ctx("on_rollback", txn, self.slots.path(txn["slot"]), reason),
                self.config.hook_timeout_s,
            )
        except UpdateError as exc:
            log.error("on_rollback hook failed: %s", exc.message)

    def _abandon(self, txn: dict[str, Any], reason: str, remember: bool = True) -> UpdateResult:
        """Close a failed transaction whose old model is in use; runs ``on_rollback``.

        ``remember``: the bundle itself failed (not the device): never retry it, never recover
        into its slot.
        """
        log.error("update to %s %s rolled back: %s", txn["name"], txn["version"], reason)
        if remember:
            remember_rolled_back(self.state, _manifest_digest(self.slots.path(txn["slot"])))
            if not txn.get("local"):  # a refused local head must not block that fleet version
                self.state.setdefault("failed", {})[f"{txn['name']}:{txn['version']}"] = reason
        self.state.get("attempts", {}).pop(f"{txn['name']}:{txn['version']}", None)
        self.state.pop("txn", None)
        self._save_state()
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
        """Fail an update after the commit point: point ``current`` back at the previous slot.

        If that is impossible (no previous model) or fails (an OSError), the result says so and
        names the version still in use; a failed switch back is retried at the next check.
        """
        prev = txn.get("previous_slot")
        if self.slots.active() == txn["slot"]:
            if not prev or not self.slots.path(prev).is_dir():
                self._abandon(txn, reason + "; no previous model to go back to")
                return UpdateResult(
                    "failed",
                    txn["version"],
                    txn["version"],
                    txn["previous_version"],
                    txn["name"],
                    f"{reason}; no previous model to go back to, so version {txn['version']} "
                    "stays in use",
                )
            txn["undo"] = reason  # a crash from here on: the next start finishes the rollback
            self.state["txn"] = txn
            self._save_state()
            try:
                self.slots.switch(prev)
            except OSError as exc:
                if self.slots.active() == txn["slot"]:
                    log.error("cannot switch back to slot %s: %s; retrying later", prev, exc)
                    return UpdateResult(
                        "failed",
                        txn["version"],
                        txn["version"],
                        txn["previous_version"],
                        txn["name"],
                        f"{reason}; switching back failed ({_os_reason(exc, switched=True)}), so "
                        f"version {txn['version']} stays in use until the next check",
                    )
            self.state["last_switch"] = time.time()
        return self._abandon(txn, reason)

    # ------------------------------------------------------------------ reporting

    def _report(self, result: UpdateResult, t0: float) -> UpdateResult:
        result.seconds = round(time.perf_counter() - t0, 3)
        if self._unsaved:
            self._save_state()
        # the version reported is the one `current` points at, whatever the code path thought
        m = self.installed()
        in_use = m.version if m else None
        if result.version != in_use:
            log.warning("reporting version %s in use, not %s", in_use, result.version)
            result.version = in_use
        self.last_result = result
        level = logging.INFO if result.ok else logging.ERROR
        log.log(
            level,
            "update check: %s%s",
            result.status,
            f" ({printable(result.reason)})" if result.reason else "",
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
            except (OSError, ValueError, UpdateError) as exc:
                log.warning("status report to %s failed: %s", self.config.report_url, exc)
        return result


def _os_reason(exc: OSError, switched: bool = False) -> str:
    if exc.errno == errno.ENOSPC:
        where = exc.filename or "device"
        if switched:
            return f"disk full ({where})"
        return f"disk full while installing ({where}); the installed model is untouched"
    return f"{type(exc).__name__}: {exc}"


def _manifest_digest(slot: Path) -> str | None:
    try:
        return hashlib.sha256((slot / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return None


def _is_local_head(m: Manifest) -> bool:
    return (m.trainable_head or {}).get("trained", {}).get("by") == "device"


def _root_error(root: Path, exc: OSError) -> EdgesmithError:
    return EdgesmithError(
        f"cannot use the agent root {root}: {exc.strerror or exc}",
        hint="give a writable folder with --root (or root in agent.yaml)",
    )
