"""Device detection on real file contents from real boards (fake roots), and on this machine."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from edgesmith.cli import main
from edgesmith.devices.detect import detect, parse_cpuinfo

ROOTS = Path(__file__).parent / "data" / "roots"


@pytest.mark.parametrize(
    ("root", "profile", "cpu", "cores", "why"),
    [
        ("rpi5", "rpi5", "Cortex-A76", 4, "device-tree model 'Raspberry Pi 5 Model B Rev 1.0'"),
        ("rpi4", "rpi4", "Cortex-A72", 4, "device-tree model 'Raspberry Pi 4 Model B Rev 1.4'"),
        ("jetson-orin-nano", "jetson-orin-nano", "Cortex-A78AE", 6, "Jetson Linux R36.4.0"),
        (
            "intel-core-ultra-npu",
            "intel-npu",
            "Intel(R) Core(TM) Ultra 7 155H",
            4,
            "accelerator /dev/accel/accel0",
        ),
        ("intel-core-ultra", "intel-cpu", "Intel(R) Core(TM) Ultra 7 155H", 4, "ISA avx_vnni"),
        ("amd-ryzen", "x86-cpu", "AMD Ryzen 7 5800X 8-Core Processor", 8, "ISA avx2 fma"),
        ("rock5b", "generic-arm64", "Cortex-A55", 8, "ISA fp asimd"),
    ],
)
def test_detects_real_boards(root: str, profile: str, cpu: str, cores: int, why: str) -> None:
    d = detect(ROOTS / root)
    assert d.profile == profile, d.reasons
    assert (d.cpu, d.cores) == (cpu, cores)
    assert why in d.reasons
    assert d.backends == {}, "backends are only asked on the real root"


def test_facts_read_from_the_files() -> None:
    pi5 = detect(ROOTS / "rpi5")
    assert pi5.arch == "aarch64" and "asimddp" in pi5.isa and pi5.memory_mb == 8051
    assert pi5.device_tree_model == "Raspberry Pi 5 Model B Rev 1.0"  # NUL stripped
    assert detect(ROOTS / "rpi4").isa == ["fp", "asimd", "evtstrm", "crc32", "cpuid"]
    npu = detect(ROOTS / "intel-core-ultra-npu")
    assert npu.accel_devices == ["/dev/accel/accel0"] and npu.vendor == "GenuineIntel"
    assert "avx512f" not in npu.isa and "avx_vnni" in npu.isa


def test_a_pi4_without_dot_product_is_not_taken_for_a_pi5(tmp_path: Path) -> None:
    # a board that claims to be a Pi 5 but lacks asimddp does not get the Pi 5 profile
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/cpuinfo").write_text((ROOTS / "rpi4/proc/cpuinfo").read_text())
    (tmp_path / "proc/device-tree/model").write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    assert detect(tmp_path).profile == "generic-arm64"


def test_32_bit_os_on_a_64_bit_board_gets_no_profile_and_a_hint() -> None:
    d = detect(ROOTS / "rpi4-32bit")
    assert d.arch == "armv7l" and d.profile is None
    assert any("install the 64-bit OS" in n for n in d.notes)


def test_empty_root_finds_nothing(tmp_path: Path) -> None:
    d = detect(tmp_path)
    assert (d.arch, d.profile, d.cores) == (None, None, 0)


def test_this_machine() -> None:
    d = detect("/")
    assert d.arch == platform.machine()
    assert d.profile is not None
    assert "onnxruntime" in d.backends and "CPUExecutionProvider" in d.backends["onnxruntime"]
    from edgesmith.runtime.profiles import load_profile

    assert load_profile(d.profile).arch == d.arch


def test_parse_cpuinfo_arm_model_name_fallback() -> None:
    facts = parse_cpuinfo(
        "processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x51\nCPU architecture: 8\nCPU part\t: 0x801\nmodel name\t: Kryo\n"
    )
    assert facts == {
        "arch": "aarch64",
        "vendor": "implementer 0x51",
        "cpu": "Kryo",
        "cores": 1,
        "isa": ["fp", "asimd"],
    }


def test_detect_cli(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["devices", "detect", "--root", str(ROOTS / "jetson-orin-nano"), "--json"])
    assert exc.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["profile"] == "jetson-orin-nano" and out["jetson_release"] == "R36.4.0"
    with pytest.raises(SystemExit) as exc:
        main(["devices", "detect", "--root", str(ROOTS / "rpi5")])
    text = capsys.readouterr().out
    assert (
        exc.value.code == 0
        and "board:        Raspberry Pi 5 Model B Rev 1.0" in text
        and "profile:      rpi5" in text
    )
    with pytest.raises(SystemExit) as exc:
        main(["devices", "detect", "--root", str(ROOTS / "rpi4-32bit")])
    captured = capsys.readouterr()
    assert exc.value.code == 2 and "error: no device profile fits this machine" in captured.err
