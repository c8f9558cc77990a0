"""Console output: rich progress bars with ETA when rich is installed and output is not quiet."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["echo", "is_quiet", "set_quiet", "track"]

T = TypeVar("T")
_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet


def is_quiet() -> bool:
    return _state["quiet"]


def echo(message: str) -> None:
    """Print a status line to stderr unless quiet."""
    if not _state["quiet"]:
        print(message, file=sys.stderr, flush=True)


def track(
    iterable: Iterable[T], description: str, total: int | None = None, transient: bool = True
) -> Iterator[T]:
    """Iterate with a progress bar (rich, with ETA) on stderr; plain iteration when quiet."""
    if _state["quiet"]:
        yield from iterable
        return
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
    except ImportError:
        echo(description)
        yield from iterable
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=transient) as progress:
        task = progress.add_task(
            description,
            total=total
            if total is not None
            else (len(iterable) if hasattr(iterable, "__len__") else None),
        )  # type: ignore[arg-type]
        for item in iterable:
            yield item
            progress.advance(task)
