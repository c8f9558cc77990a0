"""Kept importable here: the option builder lives in :mod:`edgesmith.options` (below the runtime and
the devices, whose commands use it too)."""

from edgesmith.options import click_type, field_option

__all__ = ["click_type", "field_option"]
