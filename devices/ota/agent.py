"""The update agent's lifecycle: start (lock, state, recovery, MQTT), the daemon loop, one update
check (fetch the channel, pick, download, install), installs from a file, reverting a fine-tuned
head, and reporting.

One update, in order (each step name is also a crash point for the fault tests)::

    check -> download -> verify -> extract -> before_install -> health -> switch -> after_install -> commit

Where each part lives: the install transaction (verify → commit, rollback, recovery) in
:mod:`~edgesmith.devices.ota.install`, the channel, the release and its download in
:mod:`~edgesmith.devices.ota.fetch`, whom the agent trusts in :mod:`~edgesmith.devices.ota.trust`,
what it accepts in :mod:`~edgesmith.devices.ota.policy`, its memory in
:mod:`~edgesmith.devices.ota.state`.

Example:
    >>> agent = Agent(AgentConfig(root="/var/lib/edgesmith", server="https://updates.example.com",
    ...                           trusted_keys=["/etc/edgesmith/release.pub"]))  # doctest: +SKIP
    >>> agent.start(); agent.check_once().status                                 # doctest: +SKIP
    'installed'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgesmith.errors import BundleError, EdgesmithError, UpdateError
from edgesmith.runtime.bundle import verify_bundle

from .channel import in_rollout, iso_utc, utc_now
from .config import AgentConfig, UpdateResult, printable
from .download import Deadline, post_json
from .fetch import clean_incoming, download_release, fetch_channel, pick_release
from .hooks import Hooks
from .install import Gate, Transactions, os_reason
from .policy import fleet_version
from .slots import Slots
from .state import AgentState
from .trust import Trust, is_local_head

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


class Agent(Transactions):
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
        self.state = AgentState()
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
            self.state = AgentState.load(raw, self.config.channel, self.slots.status_file)
            self.device_id = self._device_id()
            self.profile = load_profile(self.config.target or self._detect_target())
            self.trust = Trust(self.config)
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
            if self._announced_seq > self.state.seq(self.config.channel):
                rest = started + self.config.announce_min_interval_s - time.monotonic()
                if rest > 0:
                    self._stop.wait(rest)
                return

    def _announced(self, seq: int) -> None:
        # called from paho's network thread: never raise there
        if seq > self.state.seq(self.config.channel):
            self._announced_seq = max(self._announced_seq, seq)
            self._wake.set()

    def _device_id(self) -> str:
        if self.config.device_id:
            return self.config.device_id
        if self.state.device_id:
            return self.state.device_id
        try:
            mid = Path("/etc/machine-id").read_text().strip()
            # never publish the machine id itself (machine-id(5)); hash it with a fixed salt
            did = hashlib.sha256(f"edgesmith:{mid}".encode()).hexdigest()[:16] if mid else ""
        except OSError:
            did = ""
        did = did or uuid.uuid4().hex[:16]
        self.state.device_id = did
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

    def status(self) -> dict[str, Any]:
        """What ``status.json`` says besides the last result: device, channel, model in use."""
        m = self.installed()
        return {
            "device_id": self.device_id,
            "channel": self.config.channel,
            "target": self.profile.name if self.profile else self.config.target,
            "slot": self.slots.active(),
            "name": m.name if m else None,
            "version": m.version if m else None,
            "channel_seq": self.state.seq(self.config.channel) or None,
            "failed": self.state.failed,
        }

    # ------------------------------------------------------------------ checking

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
        base = fleet_version(installed)  # a head fine-tuned here keeps its fleet version
        release = None
        self._deadline = Deadline(self.config.check_deadline_s, "update check")
        try:
            self._step("check")
            channel, new = fetch_channel(self.config, self.trust.fleet, self.state, self._deadline)
            if new:
                self._save_state()
            release = pick_release(channel, self.profile, self.config.name, installed)
            if release is None:
                result = UpdateResult("up-to-date", cur, name=installed.name if installed else None)
                clean_incoming(self.slots, keep=None)
            elif installed and installed.name == release.name and release.version == base:
                result = UpdateResult("up-to-date", cur, release.version, name=release.name)
                clean_incoming(self.slots, keep=None)
            elif installed and installed.name == release.name and release.version < (base or 0):
                raise UpdateError(
                    f"channel offers {release.name} version {release.version}, older than the "
                    f"installed {base}: no downgrade",
                    hint="to undo a release, publish a new, higher version",
                )
            elif self.state.failed_before(release.name, release.version):
                reason = self.state.failed[f"{release.name}:{release.version}"]
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
                tar = download_release(self.config, self.slots, release, self._deadline, self._step)
                result = self._install(tar, release)
        except (UpdateError, BundleError, EdgesmithError) as exc:
            result = self._failed(cur, release, exc.message)
        except OSError as exc:
            result = self._failed(cur, release, os_reason(exc))
            with contextlib.suppress(OSError):
                clean_incoming(self.slots, keep=None)
        except Exception as exc:  # a bug must not end the daemon; report it
            log.exception("update check failed")
            result = self._failed(cur, release, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._deadline = None
        # a complete download that did not install is not kept (only .part files, for resume)
        with contextlib.suppress(OSError):
            for tar in self.slots.incoming.glob("*.tar"):
                tar.unlink(missing_ok=True)
        return self._report(result, t0)

    @staticmethod
    def _failed(cur: int | None, release: Any, reason: str) -> UpdateResult:
        return UpdateResult(
            "failed",
            cur,
            release.version if release else None,
            name=release.name if release else None,
            reason=reason,
        )

    # ------------------------------------------------------------------ installs from here

    def install(self, bundle: str | Path) -> UpdateResult:
        """Install a local bundle (folder or ``.tar``) through the same checks: provisioning.

        Never raises for update problems (see :meth:`check_once`).
        """
        return self._install_file(Path(bundle))

    def install_local(self, bundle: str | Path, gate: Gate | None = None) -> UpdateResult:
        """Install a bundle made on this device (a fine-tuned head) through the same A/B switch.

        The bundle must change nothing but the head of the installed model (same model files).
        ``gate(slot_path, manifest)`` runs after the health check, before the switch; raising
        :class:`UpdateError` there refuses the bundle (``rolled-back``, the old model stays).
        Refusals are not remembered as failed fleet versions. See
        :func:`edgesmith.devices.ota.local.activate`.
        """
        return self._install_file(Path(bundle), local=True, gate=gate)

    def _install_file(
        self, src: Path, local: bool = False, gate: Gate | None = None
    ) -> UpdateResult:
        self.start()
        t0 = time.perf_counter()
        m = self.installed()
        try:
            result = self._install(src, None, local=local, gate=gate)
        except (UpdateError, BundleError, EdgesmithError) as exc:
            result = UpdateResult("failed", m.version if m else None, reason=exc.message)
        except OSError as exc:
            result = UpdateResult("failed", m.version if m else None, reason=os_reason(exc))
        return self._report(result, t0)

    def revert(self) -> UpdateResult:
        """Go back from a head fine-tuned here to the model in the other slot, through the same
        transaction as an install (``before_install``, health check, switch, ``after_install``;
        ``on_rollback`` and the fine-tuned head stays if one fails). Reported like an install.

        Returns:
            ``rolled-back`` (the previous model in use) or ``failed`` (the fine-tuned head stays).

        Raises:
            UpdateError: the model in use is not a local fine-tune, or there is no healthy
                previous version of it to go back to.
        """
        self.start()
        t0 = time.perf_counter()
        cur = self.installed()
        if cur is None or not is_local_head(cur):
            raise UpdateError(
                "the model in use is not a head fine-tuned on this device", hint="nothing to revert"
            )
        other = self.slots.inactive()
        try:
            prev = verify_bundle(self.slots.path(other), check_files=False).manifest
        except BundleError:
            prev = None
        if prev is None or prev.name != cur.name or not self.healthy(other):
            raise UpdateError(
                "no healthy previous version of this model to go back to",
                hint="the other slot is empty, another model, or fails its checks",
            )
        try:
            result = self._revert_to(other, prev, cur, "reverted the fine-tuned head")
        except OSError as exc:
            result = UpdateResult(
                "failed", cur.version, prev.version, name=cur.name, reason=os_reason(exc)
            )
        return self._report(result, t0)

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


def _root_error(root: Path, exc: OSError) -> EdgesmithError:
    return EdgesmithError(
        f"cannot use the agent root {root}: {exc.strerror or exc}",
        hint="give a writable folder with --root (or root in agent.yaml)",
    )
