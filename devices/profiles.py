"""Target device profiles, read from the YAML data files in ``profiles/``."""

from __future__ import annotations

import difflib
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgesmith.errors import EdgesmithError

__all__ = ["Int8Scheme", "Profile", "list_profiles", "load_profile"]

PROFILE_DIR = Path(__file__).parent / "profiles"


class Int8Scheme(BaseModel):
    """How a target wants int8 models built."""

    model_config = ConfigDict(extra="forbid")

    weights: Literal["per-channel-symmetric", "per-tensor-symmetric"] = "per-channel-symmetric"
    activations: Literal["asymmetric-uint8", "symmetric-int8"] = "asymmetric-uint8"
    format: Literal["QDQ", "QOperator"] = "QDQ"


class Profile(BaseModel):
    """A target device: what it runs best and how."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str
    arch: Literal["aarch64", "x86_64", "armv7l"]
    isa: list[str] = Field(default_factory=list)
    device_tree_model: str | None = None
    jetson: bool = False
    accel_device: str | None = None
    formats: list[Literal["onnx", "tflite", "openvino"]]
    backend: Literal["onnxruntime", "openvino", "litert"]
    ov_device: str | None = None
    providers: list[str] = Field(default_factory=list)
    delegates: list[str] = Field(default_factory=list)
    precision: Literal["fp32", "fp16", "bf16", "int8"] = "int8"
    int8: Int8Scheme = Field(default_factory=Int8Scheme)
    threads: int | None = None
    memory_mb: int = 1024


@cache
def list_profiles() -> list[str]:
    """Names of the built-in profiles, sorted."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str) -> Profile:
    """Load a built-in profile by name, or a profile YAML file by path.

    Raises:
        EdgesmithError: unknown name (with the nearest known names) or a malformed file.
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
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return Profile(**data)
    except (yaml.YAMLError, TypeError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise EdgesmithError(
            f"malformed device profile {path}: {first}",
            hint="compare with a built-in profile: `edgesmith devices show x86-cpu`",
        ) from None
