"""The reference model for the runtime and server benchmarks, built once and cached.

``reference_bundle()`` runs ``edgesmith build examples/fashion_mnist/recipe-fp32.yaml`` into a cache
folder (``$TMPDIR/edgesmith-bench-reference``) the first time and returns the bundle folder;
``reference_onnx()`` returns the bare ONNX file inside it. Run it alone to build the cache:

    .venv/bin/python benchmarks/runtime_reference.py
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "examples" / "fashion_mnist" / "recipe-fp32.yaml"
RESULTS = ROOT / "benchmarks" / "results"


def _key() -> str:
    h = hashlib.sha256()
    for f in (RECIPE, RECIPE.parent / "weights.safetensors", RECIPE.parent / "model.py"):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def reference_bundle() -> Path:
    """The reference bundle folder (SmallCNN on Fashion-MNIST, ONNX fp32), built on first use."""
    out = Path(tempfile.gettempdir()) / f"edgesmith-bench-reference-{_key()}"
    bundles = out / "bundles"
    if not bundles.is_dir():
        print(f"building the reference model into {out} (once)", file=sys.stderr)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "edgesmith",
                "-q",
                "build",
                str(RECIPE),
                "-o",
                str(out),
                "--force",
            ],
            check=True,
        )
    return next(p for p in sorted(bundles.iterdir()) if (p / "manifest.json").is_file())


def reference_onnx() -> Path:
    """The reference model as a bare ``.onnx`` file."""
    return next(reference_bundle().glob("*.onnx"))


if __name__ == "__main__":
    print(reference_bundle())
