"""The built wheel installs only the edgesmith package (no generic top-level names) with its data files."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path


def test_wheel_file_list(tmp_path: Path, repo_root: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(repo_root),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("edgesmith-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"edgesmith", next(t for t in top if t.endswith(".dist-info"))}
    for expected in (
        "edgesmith/cli.py",
        "edgesmith/compress/__init__.py",
        "edgesmith/export/onnx.py",
        "edgesmith/runtime/backends/onnxruntime.py",
        "edgesmith/devices/profiles/rpi5.yaml",
        "edgesmith/templates/recipe.yaml",
        "edgesmith/py.typed",
    ):
        assert expected in names, expected
    # every source module lands in the wheel (a sub-package missing from pyproject's list would not)
    for folder in ("edgesmith", "compress", "export", "runtime", "devices"):
        for src in (repo_root / folder).rglob("*.py"):
            rel = src.relative_to(repo_root / folder).as_posix()
            name = f"edgesmith/{rel}" if folder == "edgesmith" else f"edgesmith/{folder}/{rel}"
            assert name in names, f"{name} missing from the wheel"
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert (
        "Provides-Extra: ort" in meta and "Requires-Dist: torch" in meta
    )  # torch only via an extra ...
    core = [
        ln for ln in meta.splitlines() if ln.startswith("Requires-Dist:") and "extra ==" not in ln
    ]
    assert not any(
        "torch" in ln or "onnxruntime" in ln for ln in core
    )  # ... never a core dependency
