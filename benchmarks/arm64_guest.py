"""The part of ``arm64_emulated.py`` that runs inside the emulated arm64 userland (numpy + edgesmith).

    qemu-aarch64-static VENV/bin/python benchmarks/arm64_guest.py TASKS.json OUT.json

For every bundle in TASKS: ``edgesmith.runtime.load`` with the device its target profile names, what
``model.info`` reports, the bundle's golden check (the OTA health check,
``edgesmith.devices.ota.health.check_health``, for bundles that load with ``device="auto"``), and
the outputs on real Fashion-MNIST test images (compared with the x86 outputs by the host). A task
with ``expect_error`` must fail to load with a message containing that text.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _golden(model: Any, root: Path) -> dict[str, Any]:
    """The manifest's golden check on ``model`` (for loads with a device other than auto)."""
    golden = model.manifest.golden or {}
    with np.load(root / golden["file"], allow_pickle=False) as data:
        inputs, expected = data["inputs"], data["outputs"]
    out = np.asarray(model(inputs))
    diff = float(np.abs(out.astype(np.float64) - expected).max())
    ok = bool(np.allclose(out, expected, atol=golden["atol"], rtol=golden["rtol"]))
    top1 = float(
        (out.reshape(len(out), -1).argmax(1) == expected.reshape(len(out), -1).argmax(1)).mean()
    )
    if golden.get("top1") and top1 < 1:
        ok = False
    return {
        "ok": ok,
        "max_abs_diff": diff,
        "top1_agreement": top1,
        "reason": "" if ok else "golden",
    }


def check(task: dict[str, Any], images: np.ndarray) -> dict[str, Any]:
    from edgesmith.devices.ota.health import check_health
    from edgesmith.errors import EdgesmithError
    from edgesmith.runtime import load

    root = Path(task["bundle"])
    row: dict[str, Any] = {"bundle": root.name}
    t0 = time.perf_counter()
    try:
        model = load(root, device=task["device"])
    except EdgesmithError as exc:
        row.update(error=exc.message, hint=exc.hint, seconds=time.perf_counter() - t0)
        return row
    row["info"] = {k: model.info.get(k) for k in ("backend", "provider", "precision", "weights")}
    if task["device"] == "auto":
        row["golden"] = check_health(root).to_json()
    else:
        row["golden"] = _golden(model, root)
    row["outputs"] = np.asarray(model(images)).tolist()
    row["seconds"] = time.perf_counter() - t0
    return row


def main() -> None:
    tasks = json.loads(Path(sys.argv[1]).read_text())
    images = np.load(tasks["images"], allow_pickle=False)
    rows = []
    for task in tasks["bundles"]:
        row = check(task, images)
        print(
            f"{row['bundle']}: "
            + (
                f"error: {row['error']}"
                if "error" in row
                else f"{row['info']} golden ok={row['golden']['ok']}"
            ),
            flush=True,
        )
        rows.append(row)
    import onnxruntime

    versions = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    Path(sys.argv[2]).write_text(json.dumps({"versions": versions, "rows": rows}))


if __name__ == "__main__":
    main()
