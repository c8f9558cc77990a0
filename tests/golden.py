"""Golden structure files for our own formats (report.json, a dumped recipe).

``key_paths`` reduces a JSON document to the set of its key paths (``artifacts[].parity.samples``):
the structure a consumer depends on, without the numbers that change from run to run. Mappings
whose keys are data (layer names, precisions) are kept too: they are stable for a given model.
Regenerate a golden file after an intended change with ``EDGESMITH_UPDATE_GOLDEN=1 pytest ...``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

GOLDEN_DIR = Path(__file__).parent / "golden"


def key_paths(doc: Any, prefix: str = "") -> set[str]:
    """Every key path of ``doc``; list items share one path (``name[]``)."""
    out: set[str] = set()
    if isinstance(doc, dict):
        for key, value in doc.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out.add(path)
            out |= key_paths(value, path)
    elif isinstance(doc, list):
        for item in doc:
            out |= key_paths(item, f"{prefix}[]")
    return out


def assert_golden(name: str, doc: Any) -> None:
    """``doc`` equals the golden file ``tests/golden/NAME.json`` (or rewrites it when asked)."""
    path = GOLDEN_DIR / f"{name}.json"
    if os.environ.get("EDGESMITH_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    expected = json.loads(path.read_text())
    assert doc == expected, f"{name} differs from {path} (set EDGESMITH_UPDATE_GOLDEN=1 to accept)"


def assert_structure(name: str, doc: Any) -> None:
    """The key paths of ``doc`` equal those in the golden file ``tests/golden/NAME.json``."""
    paths = key_paths(doc)
    path = GOLDEN_DIR / f"{name}.json"
    if os.environ.get("EDGESMITH_UPDATE_GOLDEN") != "1":
        expected = set(json.loads(path.read_text()))
        missing, added = sorted(expected - paths), sorted(paths - expected)
        assert not missing and not added, f"{name}: missing {missing}, new {added} (vs {path})"
    assert_golden(name, sorted(paths))
