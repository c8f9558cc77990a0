"""The package graph: runtime/ and devices/ run on devices, so they must not import heavy tooling.

One guard for the whole tree: a subprocess imports every module of ``edgesmith.runtime`` and
``edgesmith.devices`` and lists what came with them; the import contracts in pyproject.toml
(layers, no cycles, nothing of the build side on devices, also inside functions) are checked
by import-linter. Running a model and the device CLI are checked the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# what a device install (edgesmith[ort] / [litert] / [openvino]) does not have
FORBIDDEN = [
    "torch",
    "onnx",
    "onnxscript",
    "nncf",
    "tensorflow",
    "litert_torch",
    "torchao",
    "torch_pruning",
    "jax",
    "matplotlib",
]

_WALK = """
import importlib, pkgutil
import edgesmith.runtime, edgesmith.devices
walked = []
for package in (edgesmith.runtime, edgesmith.devices):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
        walked.append(info.name)
print(json.dumps(walked))
"""


def _loaded_after(code: str) -> tuple[list[str], str]:
    """Top-level names of the modules loaded after running ``code``, and its last stdout line."""
    probe = (
        f"import sys, json\n{code}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines[-2] if len(lines) > 1 else ""


def test_every_runtime_and_devices_module_imports_no_heavy_tooling() -> None:
    loaded, walked_line = _loaded_after(_WALK)
    walked = json.loads(walked_line)
    expected = {
        "edgesmith." + ".".join(p.with_suffix("").parts).removesuffix(".__init__")
        for top in ("runtime", "devices")
        for p in (q.relative_to(ROOT) for q in (ROOT / top).rglob("*.py"))
        if p.name != "__init__.py"
    }
    assert set(walked) >= expected  # every module file was imported, not only the packages
    assert "onnxruntime" in loaded and "starlette" in loaded  # the probe reached the backends
    assert [m for m in FORBIDDEN if m in loaded] == []


def test_import_contracts_hold() -> None:
    """Layers, no cycles, no build side on devices: the contracts in pyproject.toml."""
    res = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "lint_imports.py"), "--no-logo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "3 kept, 0 broken" in res.stdout


def test_lint_layout_matches_the_package_map() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        from lint_imports import SUBPACKAGES  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(ROOT / ".ci"))
    for name in SUBPACKAGES:
        assert f'"edgesmith.{name}" = "{name}"' in text


def test_running_a_model_imports_no_torch(tmp_path: Path) -> None:
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
    from edgesmith.export.onnx import export

    path = export(net, (torch.randn(1, 4),), tmp_path / "m.onnx")
    loaded, _ = _loaded_after(
        f"import numpy as np\nfrom edgesmith.runtime import load\nm = load({str(path)!r})\n"
        "m(np.zeros((3, 4), np.float32))"
    )
    assert "onnxruntime" in loaded
    assert [m for m in FORBIDDEN if m in loaded] == []


def test_cli_startup_for_device_commands_imports_no_torch() -> None:
    loaded, _ = _loaded_after(
        "from edgesmith.cli import cli\nfrom click.testing import CliRunner\n"
        "CliRunner().invoke(cli, ['run', '--help'])"
    )
    assert [m for m in FORBIDDEN if m in loaded] == []
