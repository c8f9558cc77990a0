"""An emulated 64-bit Arm userland for ``arm64_emulated.py``: Debian bookworm arm64 under qemu-user.

Everything comes from the package registries: Debian's packages (``qemu-user-static``,
``debootstrap`` and the arm64 userland itself) and PyPI (the aarch64 wheels). No binfmt_misc
registration, chroot or container is needed: programs of the userland run as
``qemu-aarch64-static ROOTFS/usr/bin/python3.11 ...`` with ``QEMU_LD_PREFIX=ROOTFS``, and qemu
opens ``ROOTFS/<path>`` instead of ``/<path>`` whenever that file exists. That is how the emulated
programs see an Arm ``/proc/cpuinfo`` (qemu 7.2 would show the host's x86 one, on which
onnxruntime 1.32 crashes on import and ai-edge-litert 2.3 in ``Interpreter()``) and a Raspberry Pi's
device-tree model. Paths that do not exist in the userland (the venv, bundles, work folders) are
the host's, so both sides share them.

Caches (under ``--cache``): ``rootfs/`` (about 250 MB, made once), ``wheels-cp311/`` (pip's
downloads), ``venv-cp311/`` (made under emulation with pip, as on a device; remade when the wheel
set changes, the project's own wheel reinstalled on every run).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "EXTRAS",
    "Emulator",
    "build_wheel",
    "download_wheels",
    "ensure_rootfs",
    "ensure_tools",
    "ensure_venv",
    "platform_args",
    "set_board",
]

ROOT = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
PACKAGES = ["python3", "python3-venv", "libgomp1"]  # python3.11 (as on Raspberry Pi OS bookworm)
EXTRAS = "ort,litert,openvino,serve,ota"
# qemu reads these from the userland before the host's: the board's own files go there
BOARD_FILES = [
    "proc/cpuinfo",
    "proc/meminfo",
    "proc/device-tree/model",
    "sys/firmware/devicetree/base/model",
    "etc/nv_tegra_release",
]


def platform_args(glibc_max: int = 36) -> list[str]:
    """pip's ``--platform`` list for aarch64 Linux: pip does not expand ``manylinux_2_X`` to older
    tags for another platform, so every one from 2_17 (manylinux2014) up is listed."""
    tags = [f"manylinux_2_{i}_aarch64" for i in range(17, glibc_max + 1)]
    return [arg for tag in [*tags, "manylinux2014_aarch64"] for arg in ("--platform", tag)]


def ensure_tools() -> None:
    """qemu-user-static and debootstrap from Debian's packages (installed when run as root)."""
    missing = [t for t in ("qemu-aarch64-static", "debootstrap") if shutil.which(t) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(
            f"error: {', '.join(missing)} not found\n"
            "hint: apt-get install qemu-user-static debootstrap (as root), then run this again"
        )
    print("installing qemu-user-static and debootstrap (apt)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
    subprocess.run(
        [
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "qemu-user-static",
            "debootstrap",
        ],
        env=env,
        check=True,
    )


def _inside(root: Path, rel: str) -> Path:
    """``root/rel`` for writing, refusing any path that a link would lead out of ``root``
    (debootstrap may leave ``proc`` as a link to the host's ``/proc``)."""
    target = root / rel
    for parent in [*reversed(target.relative_to(root).parents), target.relative_to(root)]:
        p = root / parent
        if p.is_symlink():
            p.unlink()
    real_root = root.resolve()
    if not str(target.parent.resolve()).startswith(str(real_root)):
        raise RuntimeError(f"{target} leads out of {root}")
    return target


def ensure_rootfs(cache: Path) -> Path:
    """Debian bookworm arm64 with Python 3.11 in ``cache/rootfs``, made once.

    ``debootstrap --foreign`` downloads and unpacks the base system without running arm64 code;
    the remaining packages it downloaded are unpacked with ``dpkg-deb -x`` (no maintainer scripts
    run: none of them matter for Python programs).
    """
    rootfs = cache / "rootfs"
    stamp = rootfs / ".edgesmith-userland"
    spec = f"{SUITE} arm64 {' '.join(PACKAGES)}\n"
    if stamp.is_file() and stamp.read_text() == spec:
        return rootfs
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="rootfs.tmp-", dir=cache))
    try:
        subprocess.run(
            [
                "debootstrap",
                "--foreign",
                "--arch=arm64",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(tmp),  # debootstrap's default mirror: Debian's own
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        archives = tmp / "var" / "cache" / "apt" / "archives"
        for deb in sorted(archives.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
            deb.unlink()
        _inside(tmp, "proc/cpuinfo").parent.mkdir(parents=True, exist_ok=True)
        if not (tmp / "usr" / "bin" / "python3.11").is_file():
            raise RuntimeError("the arm64 userland has no python3.11")
        (tmp / ".edgesmith-userland").write_text(spec)
        if rootfs.exists():
            shutil.rmtree(rootfs)
        tmp.rename(rootfs)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return rootfs


def set_board(rootfs: Path, board: Path) -> None:
    """Show the emulated programs the files of a real board (a folder laid out like ``/``)."""
    for rel in BOARD_FILES:
        target = _inside(rootfs, rel)
        if target.is_file():
            target.unlink()
        src = board / rel
        if src.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)


def _clean_copy(dest: Path) -> Path:
    skip = shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "out", ".*_cache", "tests"
    )
    shutil.copytree(ROOT, dest, ignore=skip)
    return dest


def build_wheel(dist: Path) -> tuple[Path, str]:
    """The project's wheel, built from a clean copy of the working tree (no stale ``build/``).

    Returns the wheel and a hash of its contents (file names and bytes, not zip timestamps).
    """
    dist.mkdir(parents=True, exist_ok=True)
    for old in dist.glob("edgesmith-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="edgesmith-src-") as tmp:
        src = _clean_copy(Path(tmp) / "src")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                str(dist),
                str(src),
            ],
            check=True,
            stderr=subprocess.DEVNULL,
        )
    wheel = next(dist.glob("edgesmith-*.whl"))
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            h.update(name.encode() + b"\0" + z.read(name))
    return wheel, h.hexdigest()[:16]


def download_wheels(wheel: Path, dest: Path, python: str = "3.11") -> list[Path]:
    """The aarch64 wheels of the runtime extras for CPython ``python``, at the tested versions."""
    dest.mkdir(parents=True, exist_ok=True)
    abi = "cp" + python.replace(".", "")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--only-binary=:all:",
            *platform_args(),
            "--python-version",
            python,
            "--implementation",
            "cp",
            "--abi",
            abi,
            "--abi",
            "abi3",
            "--abi",
            "none",
            "-c",
            str(ROOT / "constraints.txt"),
            "-d",
            str(dest),
            f"{wheel}[{EXTRAS}]",
        ],
        capture_output=True,
        text=True,
    )
    if res.returncode:
        raise RuntimeError(f"pip download of the aarch64 wheels failed:\n{res.stderr[-3000:]}")
    return sorted(p for p in dest.glob("*.whl") if not p.name.startswith("edgesmith-"))


class Emulator:
    """Runs programs of the arm64 userland under qemu-user as one CPU core model."""

    def __init__(self, rootfs: Path, cpu: str, home: Path) -> None:
        self.rootfs, self.cpu = rootfs, cpu
        self.qemu = shutil.which("qemu-aarch64-static") or "qemu-aarch64-static"
        home.mkdir(parents=True, exist_ok=True)
        self.env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "QEMU_LD_PREFIX": str(rootfs),
            "QEMU_CPU": cpu,
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def argv(self, program: Path, *args: str) -> list[str]:
        return [self.qemu, str(program), *args]

    def run(
        self, program: Path, *args: str, cwd: Path, timeout: float = 1800, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(program, *args),
            cwd=cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def popen(self, program: Path, *args: str, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(
                self.argv(program, *args), cwd=cwd, env=self.env, stdout=out, stderr=out
            )


def ensure_venv(emu: Emulator, cache: Path, wheels: list[Path], wheel: Path) -> Path:
    """``python3.11 -m venv`` and ``pip install edgesmith[...]`` run under emulation, as on a device.

    The venv is remade when the set of dependency wheels changes; the project's wheel is
    reinstalled every time. ``--copies``: the venv's python must be the arm64 binary itself (a
    link to ``/usr/bin/python3.11`` would resolve to the host's). pip runs from Debian's
    ``python3-pip-whl`` (ensurepip would start a second emulated process, which needs binfmt_misc).
    """
    venv = cache / "venv-cp311"
    stamp = venv / ".edgesmith-wheels"
    key = hashlib.sha256("\n".join(w.name for w in wheels).encode()).hexdigest()
    pip_whl = next((emu.rootfs / "usr/share/python-wheels").glob("pip-*.whl"))
    python = venv / "bin" / "python"
    pip = [
        str(pip_whl / "pip"),
        "install",
        "-q",
        "--no-index",
        "--find-links",
        str(wheel.parent),
        "--find-links",
        str(wheels[0].parent) if wheels else str(wheel.parent),
    ]
    if not (stamp.is_file() and stamp.read_text() == key):
        if venv.exists():
            shutil.rmtree(venv)
        emu.run(
            emu.rootfs / "usr/bin/python3.11",
            "-m",
            "venv",
            "--copies",
            "--without-pip",
            str(venv),
            cwd=cache,
            check=True,
        )
        res = emu.run(python, *pip, f"edgesmith[{EXTRAS}]", cwd=cache)
        if res.returncode:
            raise RuntimeError(f"pip install under emulation failed:\n{res.stderr[-3000:]}")
        stamp.write_text(key)
    res = emu.run(python, *pip, "--no-deps", "--force-reinstall", str(wheel), cwd=cache)
    if res.returncode:
        raise RuntimeError(
            f"pip install of {wheel.name} under emulation failed:\n{res.stderr[-3000:]}"
        )
    return python
