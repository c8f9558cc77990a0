"""The bundle manifest (schema ``edgesmith.bundle/1``): its model, its canonical bytes, and the rules
every path it lists must follow.

The manifest is stored in canonical form (sorted keys, two-space indent, UTF-8, trailing newline)
so that its exact bytes are what a signature covers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgesmith.errors import BundleError
from edgesmith.runtime.formats import FormatName
from edgesmith.text import printable

__all__ = [
    "MANIFEST",
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "SCHEMA",
    "SIGNATURE",
    "FileEntry",
    "Manifest",
    "canonical_bytes",
    "check_listed",
    "check_rel",
    "check_tree",
    "parse_manifest",
    "parse_utc",
]

SCHEMA = "edgesmith.bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MAX_PATH_BYTES = 1024
MAX_NAME_BYTES = 255


def parse_utc(text: str) -> datetime:
    """Parse an ISO-8601 time (``2026-11-26T12:00:00Z``); naive times are taken as UTC."""
    t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


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
    format: FormatName
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

    @field_validator("inputs", "outputs")
    @classmethod
    def _tensor_specs(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, spec in enumerate(v):
            if not isinstance(spec.get("name"), str) or not isinstance(spec.get("dtype"), str):
                raise ValueError(f"entry {i} needs a 'name' and a 'dtype' string")
            shape = spec.get("shape")
            if not isinstance(shape, list) or not all(
                isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                for d in shape
            ):
                raise ValueError(f"entry {i}: 'shape' must be a list of sizes or names")
        return v

    @field_validator("golden")
    @classmethod
    def _golden(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        if "file" in v and not isinstance(v["file"], str):
            raise ValueError("'file' must be a bundle path")
        for key in ("atol", "rtol"):
            x = v.get(key, 0.0)
            if isinstance(x, bool) or not isinstance(x, int | float) or not 0 <= x < math.inf:
                raise ValueError(f"'{key}' must be a non-negative number")
        if not isinstance(v.get("top1", False), bool):
            raise ValueError("'top1' must be true or false")
        return v

    @field_validator("preprocess")
    @classmethod
    def _preprocess(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            from edgesmith.runtime.specs import validate_preprocess

            validate_preprocess(v)
        return v

    @field_validator("trainable_head")
    @classmethod
    def _head_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # schema edgesmith.head/1, defined with the head code (runtime/head.py)
        from edgesmith.runtime.bundle.headspec import validate_head_spec

        return None if v is None else validate_head_spec(v)

    @field_validator("expires")
    @classmethod
    def _iso_time(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_utc(v)
            except ValueError:
                raise ValueError(f"not an ISO-8601 time: {v!r}") from None
        return v

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def expired(self, now: datetime | None = None) -> bool:
        """Whether ``expires`` lies in the past."""
        return self.expires is not None and parse_utc(self.expires) <= (
            now or datetime.now(timezone.utc)
        )


def canonical_bytes(manifest: dict[str, Any]) -> bytes:
    """The exact bytes of ``manifest.json``; a signature covers these bytes."""
    return (
        json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    ).encode("utf-8")


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


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """The manifest in ``raw``, validated: its schema, every named file listed, clean paths."""
    try:
        manifest = Manifest.model_validate(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(
            f"{where} is not valid JSON: {exc}", hint="the bundle is corrupt; download it again"
        ) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise BundleError(
            f"{where}: '{printable(loc)}': {printable(err['msg'])}",
            hint="the manifest does not follow schema edgesmith.bundle/1",
        ) from None
    check_listed(manifest, where)
    return manifest


def check_listed(manifest: Manifest, where: str) -> None:
    """Every path the manifest names is listed in ``files``; the paths form a clean tree."""
    for rel in manifest.files:
        if check_rel(rel) in (MANIFEST, SIGNATURE):
            raise BundleError(
                f"manifest lists its own '{rel}' as a file", hint="rebuild the bundle"
            )
    if manifest.model not in manifest.files:
        raise BundleError(
            f"manifest names model file '{printable(manifest.model)}' but does not list it in 'files'",
            hint="rebuild the bundle",
        )
    for what, named in (
        ("head file", (manifest.trainable_head or {}).get("file")),
        ("golden file", (manifest.golden or {}).get("file")),
        ("memory file", ((manifest.trainable_head or {}).get("memory") or {}).get("file")),
    ):
        if named is not None and named not in manifest.files:
            raise BundleError(
                f"manifest names {what} '{printable(named)}' but does not list it in 'files'",
                hint="every file a bundle uses must be listed and hashed; rebuild the bundle",
            )
    check_tree(manifest.files, where)
