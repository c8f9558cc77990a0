"""What ``pip install edgesmith[ort]`` adds on top of numpy + onnxruntime themselves.

Target (issue 6): no torch, and under 15 MB added. Two fresh virtual environments are made in a
temporary folder: one with ``pip install numpy onnxruntime``, one with ``pip install REPO[ort]``;
the figure is the difference of their ``site-packages`` sizes (as installed, with the .pyc files
pip compiles), and each package that only the second has is listed with its size. Needs PyPI.

    .venv/bin/python benchmarks/runtime_install_size.py [--extra ort]

Writes ``benchmarks/results/runtime_install_size.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from runtime_reference import RESULTS, ROOT


def _venv(path: Path, packages: list[str]) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [
        str(path / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
    ]
    subprocess.run([*pip, *packages], check=True, stderr=subprocess.DEVNULL)
    return next((path / "lib").glob("python3*/site-packages"))


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def _dists(site: Path) -> dict[str, int]:
    """Installed distributions -> bytes of the files their RECORD lists (pip records the .pyc it compiles)."""
    out = {}
    for info in site.glob("*.dist-info"):
        name = info.name.split("-")[0].lower().replace("_", "-")
        record = info / "RECORD"
        files = (
            {site / line.split(",")[0] for line in record.read_text().splitlines()}
            if record.is_file()
            else set()
        )
        out[name] = sum(f.stat().st_size for f in files if f.is_file())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--extra", default="ort")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgesmith-size-") as tmp:
        base = _venv(Path(tmp) / "base", ["numpy", "onnxruntime"])
        full = _venv(Path(tmp) / "edgesmith", [f"{ROOT}[{args.extra}]"])
        base_size, full_size = _size(base), _size(full)
        base_d, full_d = _dists(base), _dists(full)
        py = str(Path(tmp) / "edgesmith" / "bin" / "python")
        probe = subprocess.run(
            [
                py,
                "-c",
                "import importlib.util as u, onnxruntime, numpy; print(u.find_spec('torch') is None)",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp,
        )
        no_torch = probe.stdout.strip() == "True"
        smoke = subprocess.run(
            [py, "-c", "import sys, edgesmith.runtime; print('torch' in sys.modules)"],
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp,  # not the source tree, whose edgesmith/ folder would shadow the install
        )
    added = {k: v for k, v in full_d.items() if k not in base_d}
    delta = full_size - base_size
    result = {
        "extra": args.extra,
        "base_packages": sorted(base_d),
        "base_site_packages_mb": round(base_size / 1e6, 2),
        "with_edgesmith_site_packages_mb": round(full_size / 1e6, 2),
        "added_mb": round(delta / 1e6, 2),
        "added_packages_mb": {
            k: round(v / 1e6, 2) for k, v in sorted(added.items(), key=lambda kv: -kv[1])
        },
        "torch_installed": not no_torch,
        "torch_imported_by_runtime": smoke.stdout.strip() == "True",
        "target": {"max_added_mb": 15, "met": delta < 15e6 and no_torch},
    }
    print(f"numpy + onnxruntime alone: {result['base_site_packages_mb']} MB of site-packages")
    print(f"with edgesmith[{args.extra}]:        {result['with_edgesmith_site_packages_mb']} MB")
    print(
        f"added by edgesmith: {result['added_mb']} MB (target < 15 MB); torch installed: {not no_torch}"
    )
    for k, v in result["added_packages_mb"].items():
        print(f"  {k:24} {v:6.2f} MB")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtime_install_size.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
