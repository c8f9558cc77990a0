"""Device profiles: the data files, overrides, compatibility and the `devices` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from edgesmith.cli import main
from edgesmith.errors import EdgesmithError
from edgesmith.runtime.profiles import list_profiles, load_profile, resolve_target

EXPECTED = [
    "generic-arm64",
    "intel-cpu",
    "intel-npu",
    "jetson-orin-nano",
    "rpi4",
    "rpi5",
    "x86-cpu",
]


def test_all_issue_profiles_exist_and_are_consistent() -> None:
    assert list_profiles() == EXPECTED
    for name in EXPECTED:
        p = load_profile(name)
        assert p.name == name
        if p.arch == "aarch64":
            assert {"fp", "asimd"} <= set(p.isa), "aarch64 flags as /proc/cpuinfo names them"
        else:
            assert {"avx2", "fma"} <= set(p.isa)
        runs = {"onnxruntime": "onnx", "openvino": "openvino", "litert": "tflite"}[p.backend]
        assert runs in p.formats, "the preferred backend runs one of the preferred formats"
        for c in p.compatible:
            assert c in EXPECTED and c != name and load_profile(c).arch == p.arch


def test_profile_facts_match_the_hardware() -> None:
    assert "asimddp" not in load_profile("rpi4").isa and "asimddp" in load_profile("rpi5").isa
    jetson = load_profile("jetson-orin-nano")
    assert (
        jetson.providers[0] == "TensorrtExecutionProvider"
        and jetson.int8.activations == "symmetric-int8"
    )
    assert (
        load_profile("intel-npu").ov_device == "NPU"
        and load_profile("intel-npu").accel_device == "/dev/accel/accel0"
    )
    assert load_profile("x86-cpu").int8.activations == "asymmetric-uint8"  # U8S8, DESIGN.md 7


ARM = ["generic-arm64", "jetson-orin-nano", "rpi4", "rpi5"]


@pytest.mark.parametrize("name", ARM)
def test_arm_profiles_claim_only_what_the_emulated_check_proves(name: str) -> None:
    """Every format an Arm profile builds has a verified fp32 and int8 entry (checked by
    benchmarks/arm64_emulated.py on the named cores); no OpenVINO on Arm (int8 runs fp32 kernels);
    onnxruntime providers are ones PyPI's aarch64 wheel has, unless the profile requires a GPU build."""
    p = load_profile(name)
    assert "openvino" not in p.formats
    claimed = {(v.format, prec) for v in p.verified for prec in v.precisions}
    for fmt in p.formats:
        assert {(fmt, "fp32"), (fmt, "int8")} <= claimed, (name, fmt)
    for v in p.verified:
        assert set(v.cpus) <= {"cortex-a72", "cortex-a76"}
        assert v.provider == ("XNNPACK" if v.format == "tflite" else "CPUExecutionProvider")
        assert v.device == ("cpu" if p.require_accelerator else "auto")
    if p.require_accelerator:
        assert p.providers[:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    else:
        assert p.providers == ["CPUExecutionProvider"]
    # a board runs the bundles of the targets it lists as compatible: their claims name its core
    core = {"rpi4": "cortex-a72", "rpi5": "cortex-a76"}.get(name)
    for other in [name, *p.compatible] if core else []:
        assert all(core in v.cpus for v in load_profile(other).verified), (name, other)


def test_unknown_profile_suggests_the_nearest() -> None:
    with pytest.raises(EdgesmithError, match="unknown device profile 'rpi6'") as exc:
        load_profile("rpi6")
    assert exc.value.hint and exc.value.hint.startswith("did you mean 'rpi5'?")
    with pytest.raises(EdgesmithError) as exc:
        load_profile("jetson-orin")
    assert "did you mean 'jetson-orin-nano'?" in (exc.value.hint or "")


def test_recipe_overrides_any_field() -> None:
    p = resolve_target(
        {
            "profile": "rpi5",
            "threads": 2,
            "int8": {"activations": "symmetric-int8"},
            "providers": ["CPUExecutionProvider"],
        }
    )
    assert (p.threads, p.int8.activations, p.int8.weights, p.providers) == (
        2,
        "symmetric-int8",
        "per-channel-symmetric",
        ["CPUExecutionProvider"],
    )
    assert load_profile("rpi5").threads == 4, "the built-in profile is unchanged"
    assert resolve_target("rpi4").name == "rpi4"
    with pytest.raises(EdgesmithError, match="unknown profile field 'thread'") as exc:
        resolve_target({"profile": "rpi5", "thread": 2})
    assert "did you mean 'threads'?" in (exc.value.hint or "")
    with pytest.raises(EdgesmithError, match="'threads'"):
        resolve_target({"profile": "rpi5", "threads": 0})
    with pytest.raises(EdgesmithError, match="needs 'profile: NAME'"):
        resolve_target({"threads": 2})


def test_bundle_compatibility() -> None:
    assert load_profile("rpi5").runs_bundles_for("rpi4") and load_profile("rpi5").runs_bundles_for(
        "generic-arm64"
    )
    assert not load_profile("rpi4").runs_bundles_for("rpi5"), "no dot product on the Pi 4"
    assert not load_profile("rpi5").runs_bundles_for("x86-cpu")
    assert load_profile("intel-npu").runs_bundles_for("x86-cpu")


def test_profile_file_by_path_and_malformed_files(tmp_path: Path) -> None:
    data = load_profile("rpi5").model_dump()
    data.update(name="my-board", threads=3)
    good = tmp_path / "my-board.yaml"
    good.write_text(yaml.safe_dump(data))
    assert load_profile(str(good)).threads == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**data, "arch": "riscv64"}))
    with pytest.raises(EdgesmithError, match=r"malformed device profile .*'arch'"):
        load_profile(str(bad))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(EdgesmithError, match="expected a mapping"):
        load_profile(str(tmp_path / "list.yaml"))


def test_devices_cli(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["devices", "list"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and all(name in out for name in EXPECTED)
    with pytest.raises(SystemExit) as exc:
        main(["devices", "show", "rpi5", "--json"])
    assert exc.value.code == 0 and json.loads(capsys.readouterr().out)["isa"][:2] == ["fp", "asimd"]
    with pytest.raises(SystemExit) as exc:
        main(["devices", "show", "rpi6"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.splitlines() == [
        "error: unknown device profile 'rpi6'",
        "hint: did you mean 'rpi5'? known: " + ", ".join(EXPECTED),
    ]
