"""The long run of the bundle, model-file and request fuzzers (docs/security.md, "Fuzzing"):
``EDGESMITH_FUZZ_EXAMPLES`` random cases per property instead of the default suite's short
derandomized pass. Slow: ``make test-all`` or ``pytest -m slow tests/runtime/test_fuzz_long.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = os.environ.get("EDGESMITH_FUZZ_EXAMPLES", "2000")


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("suite", ["test_fuzz_bundle.py", "test_fuzz_oip.py"])
def test_long_fuzz_run_finds_nothing(suite: str) -> None:
    """Every property holds for ``EXAMPLES`` random cases (hypothesis prints what it tried)."""
    env = {**os.environ, "EDGESMITH_FUZZ_EXAMPLES": EXAMPLES}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
         "--hypothesis-show-statistics", str(ROOT / "tests" / "runtime" / suite)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary
    assert " 0 failing" in proc.stdout  # hypothesis' statistics: every property held
