"""Compression stages that run in order from a recipe.

``STAGES`` maps a recipe's stage name to its class. Third-party packages add stages through the
``edgesmith.stages`` entry-point group (``name = "pkg.module:StageClass"``).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from edgesmith.compress.base import (
    STAGES,
    Context,
    HookResult,
    Stage,
    StageConfig,
    StageRecord,
    StageResult,
    register_stage,
)

__all__ = [
    "STAGES",
    "Context",
    "HookResult",
    "Stage",
    "StageConfig",
    "StageRecord",
    "StageResult",
    "register_stage",
]


def _load_entry_points() -> None:
    for ep in entry_points(group="edgesmith.stages"):
        if ep.name not in STAGES:
            STAGES[ep.name] = ep.load()


_load_entry_points()

# built-in stages (each module registers itself; no torch at import time)
from edgesmith.compress import distill as _distill  # noqa: E402,F401
from edgesmith.compress import prune as _prune  # noqa: E402,F401
from edgesmith.compress import qat as _qat  # noqa: E402,F401  (registers "qat")
from edgesmith.compress import quantize as _quantize  # noqa: E402,F401  (registers "quantize")
