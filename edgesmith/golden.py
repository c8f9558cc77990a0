"""Moved: golden samples and tolerances live in :mod:`edgesmith.runtime.golden`, where the device
checks them. This module keeps the old import path working (``from edgesmith.golden import
golden_tolerance, pick_golden``)."""

from edgesmith.runtime.golden import (
    GOLDEN_SAMPLES,
    HOLDS_ACROSS,
    golden_tolerance,
    pick_golden,
)

__all__ = ["GOLDEN_SAMPLES", "HOLDS_ACROSS", "golden_tolerance", "pick_golden"]
