#!/usr/bin/env python3
"""Check the import contracts in pyproject.toml (``[tool.importlinter]``) with import-linter.

The checkout keeps the sub-packages beside ``edgesmith/`` (``compress/ export/ runtime/ devices/``,
mapped under ``edgesmith`` by setuptools' package-dir), but grimp reads a package from its one
folder. So this builds a throwaway folder with the installed layout (links to the real files)
and lints that. Usage: ``python .ci/lint_imports.py [lint-imports options]`` (``make lint``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the folders setuptools maps to edgesmith.<name> (pyproject.toml, [tool.setuptools] package-dir)
SUBPACKAGES = ("compress", "export", "runtime", "devices")


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="edgesmith-lint-") as tmp:
        package = Path(tmp) / "edgesmith"
        package.mkdir()
        for entry in (ROOT / "edgesmith").iterdir():
            if entry.name != "__pycache__":
                (package / entry.name).symlink_to(entry)
        for name in SUBPACKAGES:
            (package / name).symlink_to(ROOT / name, target_is_directory=True)
        lint = Path(sys.executable).with_name("lint-imports")
        command = [str(lint), "--no-cache", *argv, str(ROOT / "pyproject.toml")]
        # lint-imports puts its working folder first on sys.path: the linked tree, not the checkout
        env = {**os.environ, "PYTHONPATH": tmp}
        return subprocess.call(command, cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
