"""Console output: rich progress bars with ETA on a terminal, periodic plain lines otherwise."""

from __future__ import annotations

import sys
import time
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


def _status_text(status: dict[str, object] | None) -> str:
    if not status:
        return ""
    return " ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in status.items()
    )


def _plain(
    iterable: Iterable[T],
    description: str,
    total: int | None,
    every: float = 15.0,
    status: dict[str, object] | None = None,
) -> Iterator[T]:
    """For logs and pipes: one line at most every ``every`` seconds, with elapsed time and ETA."""
    start = last = time.monotonic()
    for done, item in enumerate(iterable, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every:
            last = now
            eta = f", eta {(now - start) / done * (total - done):.0f} s" if total else ""
            extra = f" {_status_text(status)}" if status else ""
            echo(f"{description}: {done}/{total or '?'} ({now - start:.0f} s{eta}){extra}")


def track(
    iterable: Iterable[T],
    description: str,
    total: int | None = None,
    transient: bool = True,
    status: dict[str, object] | None = None,
) -> Iterator[T]:
    """Iterate with a progress bar (rich, with ETA) on stderr; plain iteration when quiet.

    ``status`` is a dict the loop body updates (e.g. ``{"loss": 0.41, "acc": 0.87}``); it is
    shown after the bar and refreshed after every item.
    """
    if _state["quiet"]:
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
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
        yield from _plain(iterable, description, total, status=status)
        return
    console = Console(stderr=True)
    if not console.is_terminal:
        yield from _plain(iterable, description, total, status=status)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        *([TextColumn("{task.fields[status]}")] if status is not None else []),
    )
    with Progress(*columns, console=console, transient=transient) as progress:
        task = progress.add_task(description, total=total, status=_status_text(status))
        for item in iterable:
            yield item
            progress.update(task, advance=1, status=_status_text(status))
