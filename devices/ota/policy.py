"""What a device accepts: a bundle for its target (or one its profile runs), not expired, newer
than the installed version (no downgrade, no replay), of the model it follows, and not one that
failed here before."""

from __future__ import annotations

from typing import Any

from edgesmith.errors import UpdateError
from edgesmith.runtime.bundle import Manifest

from .channel import Release
from .config import AgentConfig, printable
from .state import AgentState

__all__ = ["check_manifest", "fleet_version"]


def fleet_version(m: Manifest | None) -> int | None:
    """The fleet version a bundle derives from: a head fine-tuned here keeps its base's."""
    if m is None:
        return None
    trained = (m.trainable_head or {}).get("trained", {})
    if trained.get("by") == "device" and isinstance(trained.get("base_version"), int):
        return int(trained["base_version"])
    return m.version


def check_manifest(
    m: Manifest,
    expect: Release | None,
    installed: Manifest | None,
    profile: Any,
    config: AgentConfig,
    state: AgentState,
    local: bool = False,
) -> None:
    """Refuse a bundle this device must not install.

    Args:
        m: the verified bundle's manifest.
        expect: the release the channel announced (None: a local install).
        installed: the manifest of the model in use.
        profile: this device's profile.
        local: a bundle made on this device (a fine-tuned head).

    Raises:
        UpdateError: saying why.
    """
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
    if not profile.runs_bundles_for(m.target):
        from edgesmith.runtime.profiles import list_profiles, load_profile

        arch = load_profile(m.target).arch if m.target in list_profiles() else "unknown arch"
        raise UpdateError(
            f"the bundle is built for target '{printable(m.target)}' ({arch}); this device is "
            f"'{profile.name}' ({profile.arch})",
            hint=f"build for this device: edgesmith build RECIPE --target {profile.name}",
        )
    if m.expired():
        raise UpdateError(
            f"{m.name} version {m.version} expired at {m.expires}", hint="publish a fresh build"
        )
    # a fleet bundle must be newer than the fleet version the installed one derives from; a
    # local one (a head fine-tuned here) newer than the installed bundle itself
    floor = installed.version if local and installed else fleet_version(installed)
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
    if installed is not None and installed.name != m.name and config.name != m.name:
        raise UpdateError(
            f"this device runs '{installed.name}'; the bundle is '{m.name}'",
            hint=f"to switch models, set the agent's name to '{m.name}'",
        )
    if not local and state.failed_before(m.name, m.version):
        raise UpdateError(
            f"{m.name} version {m.version} failed on this device before: "
            + state.failed[f"{m.name}:{m.version}"],
            hint="publish a fixed, higher version",
        )
