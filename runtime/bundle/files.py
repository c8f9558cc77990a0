"""The files of a bundle: how to reach them, hash them and write them durably.

Every file a bundle uses is listed (and hashed) in ``manifest.files``: the model, its ONNX
external data or OpenVINO weights, the golden data, the head arrays. This module holds the
accessors that keep it so:

* :func:`safe_member`: a bundle path below a root, not a link, not outside the root;
* :func:`member_path`: the one accessor for a file the manifest names (listed, inside the
  bundle, not a link, present);
* :func:`model_references` / :func:`check_model_references`: the files the model file itself
  opens (ONNX external data, OpenVINO ``.bin``) must be listed too;
* :func:`sha256_file`, :func:`fsync_dir`: hashing and durable writes.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from edgesmith.errors import BundleError, ModelLoadError
from edgesmith.runtime.bundle.manifest import check_rel
from edgesmith.text import printable

__all__ = [
    "check_model_references",
    "fsync_dir",
    "hash_mismatch",
    "member_path",
    "model_references",
    "model_references_from",
    "references_of",
    "safe_member",
    "sha256_file",
    "size_mismatch",
]


class Listing(Protocol):
    """What the accessors need of a manifest: its ``files`` and ``model``."""

    files: Mapping[str, Any]
    model: str


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def size_mismatch(rel: str, size: int, entry: Any) -> BundleError:
    return BundleError(
        f"bundle file '{rel}' has {size} bytes, the manifest says {entry.size}",
        hint="the file is truncated or altered; download the bundle again",
    )


def hash_mismatch(rel: str) -> BundleError:
    return BundleError(
        f"bundle file '{rel}' does not match its SHA-256 in the manifest",
        hint="the file was altered or corrupted; download the bundle again",
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


def member_path(root: str | Path, manifest: Listing, rel: Any, what: str = "file") -> Path:
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


def check_model_references(root: str | Path, manifest: Listing, refs: list[str]) -> None:
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


def references_of(root: Path, manifest: Listing) -> list[str]:
    """:func:`model_references` of a bundle's model; none for a model file that does not parse.

    Verifying a bundle checks what it holds; whether the model file is well formed is for
    ``runtime.load`` to say (it screens the file again and refuses a malformed one).
    """
    try:
        return model_references(root, manifest.model)
    except (ModelLoadError, OSError):
        return []
