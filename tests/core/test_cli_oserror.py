"""An OSError the user's machine causes is bad input (exit 2, one error line and a hint), in any
command; an OSError that points at a bug stays an internal error (exit 70). Issue 12, row 10."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgesmith.cli import describe_os_error, main
from tests.conftest import ROOT


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return int(e.value.code or 0), err.strip().splitlines()


def test_keygen_into_a_folder_that_cannot_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = _run(["keygen", "-o", "/proc/forbidden/x"], capsys)
    assert code == 2 and len(lines) == 2
    assert lines[0] == "error: /proc/forbidden: no such file or directory"
    assert lines[1].startswith("hint: ") and "/proc" in lines[1]


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process may not write to: chmod 555, or (root ignores modes) sysfs."""
    if os.geteuid() == 0:
        folder = Path("/sys/kernel")
        if not folder.is_dir() or _writable(folder):
            pytest.skip("no folder is read-only for root here")
        return folder
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def _writable(folder: Path) -> bool:
    try:
        (folder / ".edgesmith-probe").touch()
    except OSError:
        return False
    (folder / ".edgesmith-probe").unlink()
    return True


@pytest.mark.parametrize(
    "args",
    [["recipe", "init", "{ro}/recipe.yaml"], ["keygen", "-o", "{ro}/fleet"]],
    ids=["recipe-init", "keygen"],
)
def test_writing_into_a_read_only_folder(
    read_only_folder: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    code, lines = _run([a.format(ro=read_only_folder) for a in args], capsys)
    assert code == 2 and len(lines) == 2
    assert lines[0].startswith(f"error: {read_only_folder}/") and "permission denied" in lines[0]
    assert lines[1] == f"hint: check the permissions of {read_only_folder}, or choose another path"


def test_replacing_a_folder_with_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "recipe.yaml").mkdir()
    code, lines = _run(["recipe", "init", str(tmp_path / "recipe.yaml"), "--force"], capsys)
    assert code == 2
    assert lines[0].endswith(f"-> {tmp_path / 'recipe.yaml'}: is a directory")
    assert lines[1] == f"hint: {tmp_path / 'recipe.yaml'} is a folder; give a file path"
    assert (tmp_path / "recipe.yaml").is_dir() and os.listdir(tmp_path) == ["recipe.yaml"]


def test_a_full_disk_is_bad_input_not_a_crash(tmp_path: Path) -> None:
    """A real write failure: the file-size limit (RLIMIT_FSIZE) makes write() fail with EFBIG,
    as a full disk fails with ENOSPC."""
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))\n"
        "from edgesmith.cli import main\n"
        f"main(['recipe', 'init', {str(tmp_path / 'recipe.yaml')!r}])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: file too large",
        "hint: the file is too large for that file system; write elsewhere",
    ]
    assert list(tmp_path.iterdir()) == []  # nothing partially written


def test_an_oserror_from_a_bug_stays_an_internal_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgesmith.fsutil

    def broken(path: Path, data: bytes) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(edgesmith.fsutil, "atomic_write_bytes", broken)
    code, lines = _run(["recipe", "init", str(tmp_path / "r.yaml")], capsys)
    assert code == 70
    assert lines[0].startswith("error: internal error: OSError")


@pytest.mark.parametrize(
    ("exc", "message", "hint"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/x"), "/data/x: no space", "/data"),
        (
            OSError(errno.EROFS, "Read-only file system", "/ro/x"),
            "read-only",
            "/ro is on a read-only",
        ),
        (OSError(errno.EADDRINUSE, "Address already in use"), "address already in use", "--port"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "refused", "server"),
    ],
)
def test_environment_errors_are_described(exc: OSError, message: str, hint: str) -> None:
    described = describe_os_error(exc)
    assert described is not None
    assert message in described[0] and hint in described[1]


def test_bug_errnos_are_not_described() -> None:
    for code in (errno.EBADF, errno.EINVAL, errno.EXDEV):
        assert describe_os_error(OSError(code, os.strerror(code))) is None
    assert describe_os_error(OSError("no errno")) is None
