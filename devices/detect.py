"""Recognise the device this runs on and pick the best matching profile.

Reads ``/proc/cpuinfo`` (ISA flags, vendor, Arm core), the device-tree model, ``/proc/meminfo``,
``/dev/accel/accel*`` (Intel NPU), the Jetson release file ``/etc/nv_tegra_release``, and, on the
real root only, each installed backend's device list. Every path is read below ``root``, so
tests point detection at a folder holding real files copied from real boards.
"""

from __future__ import annotations

import logging
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgesmith.runtime.profiles import Profile, list_profiles, load_profile

__all__ = ["Detection", "backend_devices", "detect", "parse_cpuinfo"]

log = logging.getLogger(__name__)

# Arm Ltd. (implementer 0x41) core part numbers, from the Arm technical reference manuals
ARM_PARTS = {
    0xD03: "Cortex-A53",
    0xD04: "Cortex-A35",
    0xD05: "Cortex-A55",
    0xD07: "Cortex-A57",
    0xD08: "Cortex-A72",
    0xD09: "Cortex-A73",
    0xD0A: "Cortex-A75",
    0xD0B: "Cortex-A76",
    0xD0C: "Neoverse-N1",
    0xD0D: "Cortex-A77",
    0xD40: "Neoverse-V1",
    0xD41: "Cortex-A78",
    0xD42: "Cortex-A78AE",
    0xD44: "Cortex-X1",
    0xD46: "Cortex-A510",
    0xD47: "Cortex-A710",
    0xD48: "Cortex-X2",
    0xD49: "Neoverse-N2",
    0xD4B: "Cortex-A78C",
    0xD4C: "Cortex-X1C",
}
DT_MODEL_PATHS = ("proc/device-tree/model", "sys/firmware/devicetree/base/model")
JETSON_RELEASE = "etc/nv_tegra_release"
MAX_READ = 1 << 20


@dataclass
class Detection:
    """What was found on the device, and the profile that fits it best (None if none does)."""

    arch: str | None
    vendor: str | None
    cpu: str | None
    cores: int
    isa: list[str]
    device_tree_model: str | None
    jetson_release: str | None
    accel_devices: list[str]
    memory_mb: int | None
    backends: dict[str, list[str]]
    profile: str | None = None
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _read(root: Path, rel: str) -> str | None:
    p = root / rel
    try:
        with open(p, "rb") as f:
            return f.read(MAX_READ).decode("utf-8", "replace")
    except OSError:
        return None


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """The facts detection needs from ``/proc/cpuinfo`` text (x86 or Arm).

    Returns:
        ``{"arch", "vendor", "cpu", "cores", "isa"}``; unknown facts are None.

    Example:
        >>> parse_cpuinfo("processor\\t: 0\\nFeatures\\t: fp asimd\\nCPU architecture: 8\\n")["arch"]
        'aarch64'
    """
    first: dict[str, str] = {}
    tail: dict[str, str] = {}
    cores = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            cores += 1
        if cores <= 1:
            first.setdefault(key, value)
        tail[key] = value
    facts: dict[str, Any] = {"arch": None, "vendor": None, "cpu": None, "cores": cores, "isa": []}
    if "flags" in first or "vendor_id" in first:
        facts["arch"] = "x86_64" if " lm " in f" {first.get('flags', '')} " else "x86"
        facts["vendor"] = first.get("vendor_id")
        facts["cpu"] = first.get("model name")
        facts["isa"] = first.get("flags", "").split()
    elif "Features" in first:
        arch = first.get("CPU architecture", "")
        facts["arch"] = "aarch64" if arch == "8" else "armv7l" if arch == "7" else None
        facts["isa"] = first.get("Features", "").split()
        try:
            impl, part = int(first["CPU implementer"], 16), int(first["CPU part"], 16)
            facts["vendor"] = "ARM" if impl == 0x41 else f"implementer {impl:#x}"
            facts["cpu"] = ARM_PARTS.get(part) if impl == 0x41 else None
        except (KeyError, ValueError):
            pass
        facts["cpu"] = facts["cpu"] or first.get("model name") or tail.get("Hardware")
    return facts


def backend_devices() -> dict[str, list[str]]:
    """Devices each installed backend reports: ORT providers, OpenVINO devices, LiteRT CPU."""
    found: dict[str, list[str]] = {}
    try:
        import onnxruntime

        found["onnxruntime"] = list(onnxruntime.get_available_providers())
    except ImportError:
        pass
    try:
        import openvino

        found["openvino"] = list(openvino.Core().available_devices)
    except ImportError:
        pass
    except Exception as exc:  # a broken plugin must not break detection
        log.warning("OpenVINO could not list devices: %s", exc)
    for mod in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            __import__(mod)
            found["litert"] = ["CPU"]
            break
        except ImportError:
            continue
    return found


def _score(p: Profile, d: Detection, root: Path) -> tuple[float, list[str]] | None:
    """How well profile ``p`` fits (higher is more specific), with reasons; None if it does not."""
    if d.arch != p.arch:
        return None
    why = [f"arch {d.arch}"]
    missing = [f for f in p.isa if f not in d.isa]
    if missing:
        return None
    if p.isa:
        why.append("ISA " + " ".join(p.isa))
    score = 1.0 + 0.01 * len(p.isa)
    if p.isa_any:
        have = [f for f in p.isa_any if f in d.isa]
        if not have:
            return None
        why.append(f"ISA {have[0]}")
        score += 2
    if p.vendor:
        if d.vendor != p.vendor:
            return None
        why.append(f"vendor {p.vendor}")
        score += 2
    if p.device_tree_model:
        if p.device_tree_model not in (d.device_tree_model or ""):
            return None
        why.append(f"device-tree model '{d.device_tree_model}'")
        score += 10
    if p.jetson:
        if d.jetson_release is None:
            return None
        why.append(f"Jetson Linux {d.jetson_release}")
        score += 5
    if p.accel_device:
        if not (root / p.accel_device.lstrip("/")).exists():
            return None
        why.append(f"accelerator {p.accel_device}")
        score += 10
    return score, why


def detect(root: str | Path = "/", probe_backends: bool | None = None) -> Detection:
    """Read the device's files below ``root`` and pick the most specific matching profile.

    Args:
        root: the file-system root to read (a folder of copied files in tests).
        probe_backends: ask installed backends for their devices (default: only for ``/``).

    Example:
        >>> detect().profile        # doctest: +SKIP
        'rpi5'
    """
    root = Path(root)
    real = root.resolve() == Path("/")
    cpu = parse_cpuinfo(_read(root, "proc/cpuinfo") or "")
    dt = next((t for t in (_read(root, r) for r in DT_MODEL_PATHS) if t), None)
    dt_model = dt.replace("\x00", "").strip() if dt else None
    jr = _read(root, JETSON_RELEASE)
    jetson = None
    if jr is not None:
        m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", jr)
        jetson = f"R{m.group(1)}.{m.group(2)}" if m else "unknown release"
    mem = re.search(r"MemTotal:\s*(\d+)\s*kB", _read(root, "proc/meminfo") or "")
    arch = cpu["arch"] or (platform.machine() if real else None)
    d = Detection(
        arch=arch,
        vendor=cpu["vendor"],
        cpu=cpu["cpu"],
        cores=cpu["cores"],
        isa=cpu["isa"],
        device_tree_model=dt_model,
        jetson_release=jetson,
        accel_devices=sorted(str(p.relative_to(root)) for p in (root / "dev/accel").glob("accel*"))
        if (root / "dev/accel").is_dir()
        else [],
        memory_mb=int(mem.group(1)) // 1024 if mem else None,
        backends=backend_devices() if (real if probe_backends is None else probe_backends) else {},
    )
    d.accel_devices = ["/" + a for a in d.accel_devices]
    best: tuple[float, str, list[str]] | None = None
    for name in list_profiles():
        fit = _score(load_profile(name), d, root)
        if fit and (best is None or fit[0] > best[0]):
            best = (fit[0], name, fit[1])
    if best is None:
        d.notes.append(
            f"no profile fits arch {d.arch or 'unknown'}"
            + (
                " (a 32-bit OS on a 64-bit board? install the 64-bit OS)"
                if d.arch == "armv7l"
                else ""
            )
        )
        return d
    d.profile, d.reasons = best[1], best[2]
    prof = load_profile(best[1])
    if d.backends and prof.backend not in d.backends:
        d.notes.append(
            f"profile backend '{prof.backend}' is not installed: pip install edgesmith[{_extra(prof.backend)}]"
        )
    if prof.ov_device and "openvino" in d.backends and prof.ov_device not in d.backends["openvino"]:
        d.notes.append(f"OpenVINO does not list device {prof.ov_device}: install its driver/plugin")
    if d.memory_mb is not None and d.memory_mb < prof.memory_mb:
        d.notes.append(
            f"{d.memory_mb} MB of memory is below the profile's {prof.memory_mb} MB budget"
        )
    return d


def _extra(backend: str) -> str:
    return {"onnxruntime": "ort", "openvino": "openvino", "litert": "litert"}[backend]
