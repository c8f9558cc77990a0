"""Which files a bundle holds and uses, and the only ways to reach them.

Every file a bundle uses is listed (and hashed) in ``manifest.files``: the model, its ONNX
external data or OpenVINO weights, the golden data, the head arrays. This module holds the rules
that make that so:

* :func:`check_rel`: a bundle path is a clean relative POSIX path, printable, not too long;
* :func:`check_tree`: no path is both a file and a folder (``x`` and ``x/y``);
* :func:`member_path`: the one accessor for a file the manifest names (listed, inside the
  bundle, not a link, present);
* :func:`model_references` / :func:`check_model_references`: the files the model file itself
  opens (ONNX external data, OpenVINO ``.bin``) must be listed too;
* :class:`TarLimits` and :func:`screen_tar_members`: tar members are regular files and folders
  only (no links, devices, sparse or contiguous files), within a member count and a total size.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgesmith.errors import BundleError, ModelLoadError
from edgesmith.text import printable

if TYPE_CHECKING:
    import numpy as np

    from edgesmith.runtime.bundle.verify import Manifest

__all__ = [
    "DEFAULT_TAR_LIMITS",
    "MAX_GOLDEN_BYTES",
    "TarLimits",
    "check_model_references",
    "check_rel",
    "check_tree",
    "member_path",
    "model_references",
    "model_references_from",
    "printable",
    "read_golden",
    "safe_member",
    "screen_tar_members",
]

MAX_PATH_BYTES = 1024
MAX_NAME_BYTES = 255
MAX_GOLDEN_BYTES = 256 << 20


def check_rel(rel: str) -> str:
    """``rel`` as a clean relative POSIX path inside a bundle, or a BundleError."""
    if not isinstance(rel, str):
        raise BundleError(
            f"bundle path {printable(repr(rel))} is not a string", hint="rebuild the bundle"
        )
    rel = rel.removeprefix("./")
    parts = rel.split("/")
    if (
        not rel
        or rel.startswith(("/", "\\"))
        or "\\" in rel
        or any(p in ("", ".", "..") for p in parts)
        or (len(rel) > 1 and rel[1] == ":")
    ):
        raise BundleError(
            f"bundle lists an unsafe path '{printable(rel)}'",
            hint="bundle paths must be relative and stay inside the bundle",
        )
    if not rel.isprintable():
        raise BundleError(
            f"bundle path '{printable(rel)}' holds control or other non-printable characters",
            hint="name bundle files with printable characters only; rebuild the bundle",
        )
    encoded = [p.encode("utf-8") for p in parts]
    if sum(map(len, encoded)) + len(parts) > MAX_PATH_BYTES or max(map(len, encoded)) > (
        MAX_NAME_BYTES
    ):
        raise BundleError(
            f"bundle path '{printable(rel[:80])}…' is too long",
            hint=f"names of at most {MAX_NAME_BYTES} bytes, paths of at most {MAX_PATH_BYTES}",
        )
    return rel


def check_tree(paths: Iterable[str], where: str, folders: Iterable[str] = ()) -> None:
    """Refuse a set of bundle paths where one is both a file and a folder (``x`` and ``x/y``)."""
    files = set(paths)
    for rel in sorted(files | set(folders)):
        parts = rel.split("/")
        for i in range(1, len(parts) + (rel not in files)):
            prefix = "/".join(parts[:i])
            if prefix in files:
                raise BundleError(
                    f"{where}: '{printable(prefix)}' is both a file and a folder "
                    f"(for '{printable(rel)}')",
                    hint="a bundle path cannot be a file and a folder at once; rebuild the bundle",
                )


def safe_member(root: Path, rel: str) -> Path:
    """The path of bundle file ``rel`` below ``root``: checked, not a link, not outside ``root``."""
    full = root / check_rel(rel)
    if full.is_symlink():
        raise BundleError(
            f"bundle file '{printable(rel)}' is a symbolic link",
            hint="links are refused; rebuild the bundle",
        )
    if full.exists() and not full.resolve().is_relative_to(root.resolve()):
        raise BundleError(
            f"bundle file '{printable(rel)}' resolves outside the bundle",
            hint="links are refused; rebuild the bundle",
        )
    return full


def member_path(root: str | Path, manifest: Manifest, rel: Any, what: str = "file") -> Path:
    """The one way to reach a file the manifest names (golden data, head arrays, ...).

    The file must be listed in ``manifest.files`` (so it is hashed, and signed with the
    manifest), be a regular file inside the bundle and not a link.

    Raises:
        BundleError: unlisted, unsafe, a link, or missing.
    """
    if not isinstance(rel, str) or rel not in manifest.files:
        raise BundleError(
            f"manifest names {what} '{printable(rel)}' but does not list it in 'files'",
            hint="every file a bundle uses must be listed and hashed; rebuild the bundle",
        )
    path = safe_member(Path(root), rel)
    if not path.is_file():
        raise BundleError(
            f"{what} '{printable(rel)}' is missing from the bundle",
            hint="the bundle is incomplete; download it again",
        )
    return path


def read_golden(root: str | Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """A bundle's golden ``(inputs, outputs)`` through :func:`member_path`, or None without any.

    Raises:
        BundleError: the golden file is unlisted, unsafe, missing, too large, pickled, or lacks
            the ``inputs``/``outputs`` arrays.
    """
    import numpy as np

    golden = manifest.golden
    if not golden or not golden.get("file"):
        return None
    rel = golden["file"]
    path = member_path(root, manifest, rel, "golden file")
    if path.stat().st_size > MAX_GOLDEN_BYTES:
        raise BundleError(
            f"golden file '{printable(rel)}' is larger than {MAX_GOLDEN_BYTES >> 20} MiB",
            hint="golden data is a few inputs; rebuild the bundle",
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            inputs, outputs = np.asarray(data["inputs"]), np.asarray(data["outputs"])
    except KeyError as exc:
        raise BundleError(
            f"golden file '{printable(rel)}' has no {exc} array",
            hint="golden data holds 'inputs' and 'outputs'; rebuild the bundle",
        ) from None
    except (ValueError, OSError, EOFError) as exc:
        raise BundleError(
            f"golden file '{printable(rel)}' is not a numpy archive of plain arrays "
            f"({printable(str(exc)[:160])})",
            hint="rebuild the bundle",
        ) from None
    return inputs, outputs


# --------------------------------------------------------------------------- model references


def model_references(root: Path, model_rel: str, fmt_suffix: str | None = None) -> list[str]:
    """Bundle paths of the files that the model file ``model_rel`` opens besides itself.

    ONNX: each external data location (relative to the model's folder); OpenVINO IR: the ``.bin``
    next to the ``.xml``. Locations are screened by :func:`~edgesmith.runtime.onnxfile.scan_onnx`.

    Raises:
        ModelLoadError: the ONNX file is malformed or points outside its folder.
    """
    suffix = (fmt_suffix or posixpath.splitext(model_rel)[1]).lower()
    if suffix == ".onnx":
        from edgesmith.runtime.onnxfile import scan_onnx

        return model_references_from(model_rel, scan_onnx(root / model_rel).external)
    if suffix == ".xml":
        return [posixpath.splitext(model_rel)[0] + ".bin"]
    return []


def model_references_from(model_rel: str, locations: Iterable[str]) -> list[str]:
    """Bundle paths of ONNX external data ``locations`` (relative to the model's folder)."""
    folder = posixpath.dirname(model_rel)
    return sorted({posixpath.normpath(posixpath.join(folder, loc)) for loc in locations})


def check_model_references(root: str | Path, manifest: Manifest, refs: list[str]) -> None:
    """Refuse a bundle whose model opens files the manifest does not list.

    Args:
        root: the bundle folder.
        manifest: its manifest.
        refs: bundle paths the model opens (:func:`model_references`).

    Raises:
        BundleError: a referenced file is not listed in ``manifest.files``.
    """
    root = Path(root)
    missing = []
    for rel in refs:
        if rel in manifest.files:
            continue
        ir_weights = rel.endswith(".bin") and manifest.model.lower().endswith(".xml")
        if ir_weights and not (root / rel).exists():
            continue  # no weights file at all: OpenVINO says so when it opens the model
        missing.append(rel)
    if missing:
        shown = ", ".join(f"'{printable(m)}'" for m in missing[:5])
        raise BundleError(
            f"model '{printable(manifest.model)}' uses file(s) {shown} that the manifest does not "
            "list in 'files' (so they are neither hashed nor signed)",
            hint="rebuild the bundle with `edgesmith bundle create`, which lists a model's "
            "external data and weights files",
        )


def references_of(root: Path, manifest: Manifest) -> list[str]:
    """:func:`model_references` of a bundle's model; none for a model file that does not parse.

    Verifying a bundle checks what it holds; whether the model file is well formed is for
    ``runtime.load`` to say (it screens the file again and refuses a malformed one).
    """
    try:
        return model_references(root, manifest.model)
    except (ModelLoadError, OSError):
        return []


# --------------------------------------------------------------------------- tar members


@dataclass(frozen=True)
class TarLimits:
    """What a tar bundle may hold before anything is extracted.

    Attributes:
        max_members: tar entries (files and folders) at most.
        max_total_bytes: sum of the regular files' sizes at most (what extraction writes).
    """

    max_members: int = 10_000
    max_total_bytes: int = 8 << 30

    @classmethod
    def from_env(cls) -> TarLimits:
        """Defaults, overridden by ``EDGESMITH_BUNDLE_MAX_BYTES`` / ``EDGESMITH_BUNDLE_MAX_MEMBERS``."""
        kw: dict[str, int] = {}
        for env, key in (
            ("EDGESMITH_BUNDLE_MAX_BYTES", "max_total_bytes"),
            ("EDGESMITH_BUNDLE_MAX_MEMBERS", "max_members"),
        ):
            value = os.environ.get(env)
            if value:
                try:
                    kw[key] = int(value)
                except ValueError:
                    raise BundleError(
                        f"{env}={printable(value)} is not an integer", hint=f"unset {env}"
                    ) from None
        return cls(**kw)


DEFAULT_TAR_LIMITS = TarLimits()

_KINDS = {
    tarfile.SYMTYPE: "link",
    tarfile.LNKTYPE: "link",
    tarfile.CHRTYPE: "special file",
    tarfile.BLKTYPE: "special file",
    tarfile.FIFOTYPE: "special file",
    tarfile.CONTTYPE: "contiguous file",
    tarfile.GNUTYPE_SPARSE: "sparse file",
}


def screen_tar_members(
    tf: tarfile.TarFile, where: str, limits: TarLimits | None = None
) -> dict[str, tarfile.TarInfo]:
    """Read a tar's member list and refuse anything but plain files and folders.

    Refused before any data is read: more than ``max_members`` entries, links, devices, FIFOs,
    contiguous and sparse files (a sparse member expands to far more than its archived bytes),
    unsafe paths, a path that is both a file and a folder, duplicates, and regular files whose
    sizes sum to more than ``max_total_bytes``.

    Returns:
        ``{bundle path: member}`` of the regular files.
    """
    limits = limits or TarLimits.from_env()
    members: dict[str, tarfile.TarInfo] = {}
    folders: set[str] = set()
    total = 0
    for n, m in enumerate(tf):
        if n >= limits.max_members:
            raise BundleError(
                f"{where} has more than {limits.max_members} members",
                hint="this is not an edgesmith bundle (or raise EDGESMITH_BUNDLE_MAX_MEMBERS)",
            )
        if m.name in (".", "./"):
            continue
        rel = check_rel(m.name.rstrip("/") if m.isdir() else m.name)
        if m.isdir():
            folders.add(rel)
            continue
        if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or m.sparse is not None:
            kind = _KINDS.get(m.type, "sparse file" if m.sparse is not None else "special file")
            raise BundleError(
                f"{where}: member '{printable(m.name)}' is a {kind}",
                hint="bundles may hold regular files only; links, devices and sparse files "
                "are refused",
            )
        if rel in members:
            raise BundleError(
                f"{where}: member '{printable(rel)}' appears twice", hint="rebuild the bundle"
            )
        total += m.size
        if total > limits.max_total_bytes:
            raise BundleError(
                f"{where} would extract to more than {limits.max_total_bytes} bytes",
                hint="this bundle is larger than this device accepts "
                "(raise EDGESMITH_BUNDLE_MAX_BYTES to take it)",
            )
        members[rel] = m
    check_tree(members, where, folders)
    return members
