"""Target device profiles, read from the YAML data files beside this module (``runtime/profiles/``).

They live below the runtime because ``load()`` reads a bundle's target profile (threads, backend,
providers); ``edgesmith.devices`` (detection, OTA) and the build read them from here.

A profile says what a device runs best and how: CPU architecture and ISA flags (as named in
``/proc/cpuinfo``), preferred formats and backend, execution-provider/delegate order, int8
scheme, threads and memory budget, plus the facts ``edgesmith devices detect`` matches on.
A recipe may override any field: ``resolve_target({"profile": "rpi5", "threads": 2})``.
"""

from __future__ import annotations

import difflib
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgesmith.errors import EdgesmithError, RecipeError
from edgesmith.runtime.formats import FormatName
from edgesmith.validation import validate
from edgesmith.yamlutil import Loc, load_yaml_with_lines

__all__ = [
    "Int8Scheme",
    "Profile",
    "Verified",
    "list_profiles",
    "load_profile",
    "resolve_target",
]

PROFILE_DIR = Path(__file__).parent  # the built-in profiles: NAME.yaml beside this module
_HINT = "compare with a built-in profile: `edgesmith devices show x86-cpu`"


class Int8Scheme(BaseModel):
    """How a target wants int8 models built."""

    model_config = ConfigDict(extra="forbid")

    weights: Literal["per-channel-symmetric", "per-tensor-symmetric"] = "per-channel-symmetric"
    activations: Literal["asymmetric-uint8", "asymmetric-int8", "symmetric-int8"] = (
        "asymmetric-uint8"
    )
    format: Literal["QDQ", "QOperator"] = "QDQ"


class Verified(BaseModel):
    """One (format, precisions, provider) combination a check has run on this target's CPU cores.

    ``benchmarks/arm64_emulated.py`` proves the Arm entries under qemu-user and fails when a claim
    does not hold (the bundle must load there, report this provider, pass its golden check).
    """

    model_config = ConfigDict(extra="forbid")

    format: FormatName
    precisions: list[Literal["fp32", "fp16", "int8"]]
    provider: str  # what info["provider"] reports: an onnxruntime provider, LiteRT's "XNNPACK"
    cpus: list[str]  # the cores it ran on (qemu -cpu names for emulated Arm cores)
    device: Literal["auto", "cpu"] = "auto"  # the load() device it ran with


class Profile(BaseModel):
    """A target device: what it runs best and how, and how to recognise it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str
    arch: Literal["aarch64", "x86_64", "armv7l"]
    isa: list[str] = Field(default_factory=list)  # every flag must be present
    isa_any: list[str] = Field(default_factory=list)  # at least one must be present
    vendor: str | None = None  # /proc/cpuinfo vendor_id (x86)
    device_tree_model: str | None = None  # a substring of /proc/device-tree/model
    jetson: bool = False  # /etc/nv_tegra_release present
    accel_device: str | None = None  # e.g. /dev/accel/accel0 (Intel NPU)
    compatible: list[str] = Field(default_factory=list)  # other targets whose bundles run here
    formats: list[FormatName]
    backend: Literal["onnxruntime", "openvino", "litert"]
    ov_device: str | None = None
    providers: list[str] = Field(default_factory=list)
    # device="auto" refuses to fall back to the CPU when none of the accelerator providers above is
    # in the installed onnxruntime (a Jetson without NVIDIA's GPU build): a clear error, not a
    # model that quietly runs many times slower
    require_accelerator: bool = False
    delegates: list[str] = Field(default_factory=list)
    precision: Literal["fp32", "fp16", "bf16", "int8"] = "int8"
    int8: Int8Scheme = Field(default_factory=Int8Scheme)
    threads: int | None = Field(default=None, ge=1)
    memory_mb: int = Field(default=1024, ge=16)
    verified: list[Verified] = Field(default_factory=list)  # what a check has proven runs here

    def runs_bundles_for(self, target: str) -> bool:
        """Whether a bundle built for ``target`` may be installed on this device."""
        return target == self.name or target in self.compatible

    def with_overrides(self, overrides: dict[str, Any]) -> Profile:
        """A copy with some fields replaced (nested ``int8`` keys merge), validated.

        Raises:
            EdgesmithError: an unknown field (with the nearest name) or a bad value.
        """
        data = self.model_dump()
        for key, value in overrides.items():
            if key not in Profile.model_fields:
                close = difflib.get_close_matches(key, list(Profile.model_fields), n=1)
                raise EdgesmithError(
                    f"unknown profile field '{key}' in the target overrides",
                    hint=(f"did you mean '{close[0]}'? " if close else "")
                    + f"fields: {', '.join(Profile.model_fields)}",
                )
            if key == "int8" and isinstance(value, dict):
                data["int8"] = {**data["int8"], **value}
            else:
                data[key] = value
        return _validate(data, f"profile '{self.name}' with overrides")


def _validate(data: Any, where: str, lines: dict[Loc, int] | None = None) -> Profile:
    """A Profile, or one error listing every problem (``where:line: 'field': ...``)."""
    return validate(Profile, data, source=where, lines=lines, hint=_HINT)


@cache
def list_profiles() -> list[str]:
    """Names of the built-in profiles, sorted."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str, overrides: dict[str, Any] | None = None) -> Profile:
    """Load a built-in profile by name, or a profile YAML file by path, with optional overrides.

    Raises:
        EdgesmithError: unknown name (with the nearest known name) or a malformed file.

    Example:
        >>> load_profile("rpi5").backend
        'onnxruntime'
    """
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        if name not in list_profiles():
            close = difflib.get_close_matches(name, list_profiles(), n=1, cutoff=0.5)
            raise EdgesmithError(
                f"unknown device profile '{name}'",
                hint=(f"did you mean '{close[0]}'? " if close else "")
                + f"known: {', '.join(list_profiles())}",
            )
        path = PROFILE_DIR / f"{name}.yaml"
    try:  # the recipe's safe loader, which also keeps every key's line
        data, lines = load_yaml_with_lines(path)
    except RecipeError as exc:
        raise EdgesmithError(f"malformed device profile: {exc.message}", hint=_HINT) from None
    if not isinstance(data, dict):
        raise EdgesmithError(
            f"malformed device profile {path}: expected a mapping of fields", hint=_HINT
        )
    profile = _validate(data, f"malformed device profile {path}", lines)
    return profile.with_overrides(overrides) if overrides else profile


def resolve_target(target: str | dict[str, Any]) -> Profile:
    """A recipe's ``target``: a profile name, or ``{profile: NAME, <field>: <override>, ...}``.

    Example:
        >>> resolve_target({"profile": "rpi5", "threads": 2}).threads
        2
    """
    if isinstance(target, str):
        return load_profile(target)
    overrides = dict(target)
    name = overrides.pop("profile", None)
    if not isinstance(name, str):
        raise EdgesmithError(
            "a target given as a mapping needs 'profile: NAME'",
            hint="e.g. target: {profile: rpi5, threads: 2}",
        )
    return load_profile(name, overrides)
