"""Deploy bundles: a folder holding ``manifest.json``, the model file(s) and ``manifest.sig``.

The manifest is stored in canonical form (sorted keys, two-space indent, UTF-8, trailing newline)
so that its exact bytes are what a signature covers. Reading a bundle checks, before anything
else in it is used, that every listed file has the recorded size and SHA-256 and that no path
leaves the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgesmith.errors import BundleError

__all__ = [
    "MANIFEST",
    "SCHEMA",
    "SIGNATURE",
    "FileEntry",
    "Manifest",
    "canonical_bytes",
    "read_bundle",
    "sha256_file",
    "write_bundle",
]

SCHEMA = "edgesmith.bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MAX_MANIFEST_BYTES = 4 << 20


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Manifest(BaseModel):
    """The manifest of a bundle (DESIGN.md section 4)."""

    model_config = ConfigDict(extra="forbid")

    schema_: Literal["edgesmith.bundle/1"] = Field(default="edgesmith.bundle/1", alias="schema")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    version: int = Field(ge=1)
    created: str
    expires: str | None = None
    target: str
    format: Literal["onnx", "tflite", "openvino"]
    precision: str
    model: str
    files: dict[str, FileEntry]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    preprocess: dict[str, Any] | None = None
    labels: list[str] | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    golden: dict[str, Any] | None = None
    trainable_head: dict[str, Any] | None = None
    build: dict[str, Any] = Field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def canonical_bytes(manifest: dict[str, Any]) -> bytes:
    """The exact bytes of ``manifest.json``; a signature covers these bytes."""
    return (
        json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    ).encode("utf-8")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _safe_member(root: Path, rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith(("/", "\\")) or not rel:
        raise BundleError(
            f"bundle lists an unsafe path '{rel}'",
            hint="bundle paths must be relative and stay inside the bundle",
        )
    full = root / p
    if full.is_symlink():
        raise BundleError(
            f"bundle file '{rel}' is a symbolic link", hint="links are refused; rebuild the bundle"
        )
    return full


def read_bundle(path: str | Path, verify: bool = True) -> Manifest:
    """Read and verify a bundle folder's manifest and files.

    Raises:
        BundleError: missing or malformed manifest, unsafe paths, missing files, size or hash mismatch.
    """
    root = Path(path)
    mpath = root / MANIFEST
    if not root.is_dir() or not mpath.is_file():
        raise BundleError(
            f"{root} is not a bundle (no {MANIFEST})",
            hint="build one with `edgesmith build` or `edgesmith bundle create`",
        )
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"{mpath} is larger than {MAX_MANIFEST_BYTES} bytes",
            hint="this is not an edgesmith manifest",
        )
    raw = mpath.read_bytes()
    try:
        data = json.loads(raw)
        manifest = Manifest.model_validate(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(
            f"{mpath} is not valid JSON: {exc}", hint="the bundle is corrupt; download it again"
        ) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise BundleError(
            f"{mpath}: '{where}': {err['msg']}",
            hint="the manifest does not follow schema edgesmith.bundle/1",
        ) from None
    if manifest.model not in manifest.files:
        raise BundleError(
            f"manifest names model file '{manifest.model}' but does not list it in 'files'",
            hint="rebuild the bundle",
        )
    if verify:
        for rel, entry in manifest.files.items():
            full = _safe_member(root, rel)
            if not full.is_file():
                raise BundleError(
                    f"bundle file '{rel}' is missing",
                    hint="the bundle is incomplete; download it again",
                )
            size = full.stat().st_size
            if size != entry.size:
                raise BundleError(
                    f"bundle file '{rel}' has {size} bytes, the manifest says {entry.size}",
                    hint="the file is truncated or altered; download the bundle again",
                )
            if sha256_file(full) != entry.sha256:
                raise BundleError(
                    f"bundle file '{rel}' does not match its SHA-256 in the manifest",
                    hint="the file was altered or corrupted; download the bundle again",
                )
    return manifest


def write_bundle(out: str | Path, manifest: dict[str, Any], files: dict[str, Path]) -> Manifest:
    """Write a bundle folder atomically: copy ``files`` (bundle path -> source), hash them, write the manifest.

    ``manifest`` holds every field but ``schema`` and ``files``, which are filled in here.
    """
    out = Path(out)
    if out.exists():
        raise BundleError(f"{out} already exists", hint="pick another path or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        entries: dict[str, dict[str, Any]] = {}
        for rel, src in files.items():
            dst = _safe_member(tmp, rel)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            entries[rel] = {"sha256": sha256_file(dst), "size": dst.stat().st_size}
        doc = {
            "schema": SCHEMA,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **manifest,
            "files": entries,
        }
        try:
            validated = Manifest.model_validate(doc)
        except ValidationError as exc:
            raise BundleError(
                f"invalid manifest: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
            ) from None
        (tmp / MANIFEST).write_bytes(canonical_bytes(validated.to_json()))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return validated
