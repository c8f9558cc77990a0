"""The format of ``manifest.trainable_head`` (schema ``edgesmith.head/1``) and of its ``memory``
entry: part of the bundle format, checked when a manifest is read. The numpy head that runs it is
in :mod:`edgesmith.runtime.finetune.head`; the memory's samples in
:mod:`edgesmith.runtime.finetune.memory`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "DEFAULT_BUDGET",
    "HEAD_FILE",
    "HEAD_SCHEMA",
    "MEMORY_FILE",
    "POLICIES",
    "HeadSpec",
    "LayerSpec",
    "MemorySpec",
    "backbone_fingerprint",
    "validate_head_spec",
]

HEAD_SCHEMA = "edgesmith.head/1"
HEAD_FILE = "head.npz"
POLICIES = ("keep", "replace")
MEMORY_FILE = "memory.npz"
DEFAULT_BUDGET = 0.02  # accuracy (fraction) the old classes may lose


class MemorySpec(BaseModel):
    """``manifest.trainable_head.memory``."""

    model_config = ConfigDict(extra="forbid")

    file: str = MEMORY_FILE
    form: Literal["inputs", "features"]
    exemplars_per_class: int = Field(ge=0)
    holdout_per_class: int = Field(ge=0)
    classes: int = Field(ge=1)
    bytes: int = Field(ge=0)
    budget: float = Field(default=DEFAULT_BUDGET, ge=0, le=1)
    # the build head's accuracy on the holdout samples, with this bundle's backbone
    reference_accuracy: float | None = Field(default=None, ge=0, le=1)
    selection: str = "herding"


class LayerSpec(BaseModel):
    """One layer of a head: ``linear`` (with its sizes), ``relu`` or ``dropout`` (with ``p``)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["linear", "relu", "dropout"]
    in_features: int | None = Field(default=None, ge=1)
    out_features: int | None = Field(default=None, ge=1)
    p: float | None = Field(default=None, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _sizes(self) -> LayerSpec:
        if self.type == "linear" and (self.in_features is None or self.out_features is None):
            raise ValueError("a linear layer needs in_features and out_features")
        if self.type != "linear" and (self.in_features or self.out_features):
            raise ValueError(f"a {self.type} layer has no sizes")
        return self


class HeadSpec(BaseModel):
    """``manifest.trainable_head``: what the head is, how it was trained, what OTA does with it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["edgesmith.head/1"] = Field(default="edgesmith.head/1", alias="schema")
    kind: Literal["linear", "mlp"]
    file: str = HEAD_FILE
    feature_output: str
    feature_size: int = Field(ge=1)
    classes: int = Field(ge=1)
    layers: list[LayerSpec] = Field(min_length=1)
    normalize: bool = False
    policy: Literal["keep", "replace"] = "keep"
    trained: dict[str, Any] = Field(default_factory=dict)
    # what the device keeps of the build classes (runtime/memory.py); None: nothing shipped
    memory: MemorySpec | None = None

    @model_validator(mode="after")
    def _chain(self) -> HeadSpec:
        linears = [layer for layer in self.layers if layer.type == "linear"]
        if not linears:
            raise ValueError("a head needs at least one linear layer")
        if self.layers[-1].type != "linear":
            raise ValueError("the last layer of a head must be linear (it gives the logits)")
        size = self.feature_size
        for i, layer in enumerate(linears):
            if layer.in_features != size:
                raise ValueError(
                    f"linear layer {i} takes {layer.in_features} inputs but gets {size}"
                )
            size = int(layer.out_features or 0)
        if size != self.classes:
            raise ValueError(f"the head gives {size} outputs but 'classes' is {self.classes}")
        if self.kind == "linear" and len(self.layers) != 1:
            raise ValueError("kind 'linear' is one linear layer; use kind 'mlp' for more")
        return self

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def validate_head_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """Check a ``trainable_head`` mapping; return it in canonical form.

    Raises:
        ValueError: with the first problem (pydantic turns it into a manifest error).
    """
    try:
        return HeadSpec.model_validate(doc).to_json()
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ValueError(
            f"trainable_head{'.' + loc if loc else ''}: {err['msg'].removeprefix('Value error, ')}"
        ) from None


def backbone_fingerprint(manifest: Any) -> str:
    """SHA-256 over the hashes of a bundle's files except the head and the golden data.

    Two bundles with the same fingerprint run the same backbone (model file, external weights),
    so features and heads carry over between them. A bundle's memory of its build classes
    (``trainable_head.memory`` and its file) counts too: a head fine-tuned on a device must keep
    the fleet's memory, reference accuracy and budget.
    """
    skip = {(manifest.trainable_head or {}).get("file"), (manifest.golden or {}).get("file")}
    skip.discard(manifest.model)  # the model file always counts, whatever else the manifest says
    files = {rel: e.sha256 for rel, e in manifest.files.items() if rel not in skip}
    memory = (manifest.trainable_head or {}).get("memory")
    doc: dict[str, Any] = files if not memory else {"files": files, "memory": memory}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
