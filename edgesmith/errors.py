"""The one exception hierarchy of edgesmith.

Every error a user can cause derives from :class:`EdgesmithError` and carries a one-line
``message`` (what was received, what was expected) and an optional ``hint`` (how to fix it).
Only ``edgesmith.cli`` turns them into exit codes: 2 for bad input or usage, 1 for a pipeline
that ran and failed a check.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "CheckFailed",
    "CompressionError",
    "DataError",
    "EdgesmithError",
    "ExportError",
    "InputError",
    "ModelLoadError",
    "RecipeError",
    "UnsupportedOpError",
    "UpdateError",
]


class EdgesmithError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` 2 means bad input or usage."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class RecipeError(EdgesmithError):
    """The recipe file is missing, malformed, or does not match the schema."""


class ModelLoadError(EdgesmithError):
    """A model factory, weights file or model file could not be loaded safely."""


class DataError(EdgesmithError):
    """A data set is missing, malformed, or has the wrong shape."""


class InputError(EdgesmithError, ValueError):
    """A tensor handed to a model has the wrong shape, dtype or values."""


class ExportError(EdgesmithError):
    """A model could not be exported to a format."""


class UnsupportedOpError(ExportError):
    """A format or backend cannot run an operator of the model."""

    def __init__(
        self,
        op: str,
        fmt: str,
        layer: str | None = None,
        workarounds: list[str] | None = None,
    ) -> None:
        where = f" in layer '{layer}'" if layer else ""
        super().__init__(
            f"{fmt} cannot express operator '{op}'{where}",
            hint="; ".join(workarounds) if workarounds else None,
        )
        self.op = op
        self.format = fmt
        self.layer = layer
        self.workarounds = workarounds or []


class CompressionError(EdgesmithError):
    """A model cannot be compressed as asked: a layer that cannot be pruned, a teacher that does
    not fit the student, a training checkpoint of another model."""


class BundleError(EdgesmithError):
    """A deploy bundle is malformed, tampered with, or fails verification."""


class CheckFailed(EdgesmithError):
    """The pipeline ran, but a check (parity, accuracy budget, health) failed."""

    exit_code = 1


class UpdateError(EdgesmithError):
    """An over-the-air update was refused or failed; the installed model is left untouched."""

    exit_code = 1
