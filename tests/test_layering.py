"""edgesmith.runtime and edgesmith.devices run on devices: they must not import heavy tooling."""

from __future__ import annotations

import json
import subprocess
import sys

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


def _loaded_after(code: str) -> list[str]:
    probe = (
        f"{code}\nimport sys, json\nprint(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_runtime_and_devices_import_no_heavy_tooling() -> None:
    loaded = _loaded_after(
        "import edgesmith.runtime, edgesmith.devices, edgesmith.runtime.backends.onnxruntime"
    )
    assert "onnxruntime" in loaded  # the probe really imported the backend ...
    assert [m for m in FORBIDDEN if m in loaded] == []  # ... and nothing heavy came with it


def test_running_a_model_imports_no_torch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
    from edgesmith.export.onnx import export

    path = export(net, (torch.randn(1, 4),), tmp_path / "m.onnx")
    loaded = _loaded_after(
        f"import numpy as np\nfrom edgesmith.runtime import load\nm = load({str(path)!r})\nm(np.zeros((3, 4), np.float32))"
    )
    assert [m for m in FORBIDDEN if m in loaded] == []
    assert np.zeros(1).shape == (1,)


def test_cli_startup_for_device_commands_imports_no_torch() -> None:
    loaded = _loaded_after(
        "from edgesmith.cli import cli\nfrom click.testing import CliRunner\nCliRunner().invoke(cli, ['run', '--help'])"
    )
    assert [m for m in FORBIDDEN if m in loaded] == []
