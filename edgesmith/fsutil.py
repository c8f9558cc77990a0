"""Atomic file and folder output: write to a temporary sibling, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgesmith.errors import EdgesmithError

__all__ = ["atomic_dir", "atomic_write_bytes", "check_output_dir"]


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing output folder unless ``force``; refuse a file in the way always."""
    if out.exists() and not out.is_dir():
        raise EdgesmithError(
            f"output path {out} exists and is not a folder", hint="pick another -o path"
        )
    if out.exists() and not force:
        raise EdgesmithError(
            f"output folder {out} already exists",
            hint="pass --force to replace it, or pick another -o path",
        )


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` only if the block succeeds.

    On failure the temporary folder is removed and ``out`` (if it existed) is untouched. With
    ``force`` an existing ``out`` is replaced by a rename, so readers see the old or the new
    folder, never a mixture.
    """
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename.

    ``mode`` sets the file's permissions (e.g. ``0o600`` for secrets); the default is what a plain
    ``open()`` would create under the current umask.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    if mode is None:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
