"""The recipe's schema: pydantic models of every section (DESIGN.md section 9).

Import-light (pydantic only): the stages, the exporters and the data loaders use these types
without pulling in the recipe loader (``edgesmith.recipe``), which sits above them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "DTYPES",
    "FASHION_MNIST_PATH",
    "OUTPUT_KINDS",
    "RECIPE_VERSION",
    "DataConfig",
    "DimSpec",
    "HeadMemoryConfig",
    "InputSpec",
    "ModelConfig",
    "OutputSpec",
    "ParityTolerance",
    "PreprocessConfig",
    "Recipe",
    "StageSpec",
    "TrainableHeadConfig",
    "parity_tolerance",
]

RECIPE_VERSION = 1
FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
DTYPES = ("float32", "float16", "uint8", "int8", "int32", "int64", "bool")
# what a model output is; it decides how exported outputs are compared with PyTorch's (parity),
# how golden outputs are checked on devices, and which distillation loss applies
# (edgesmith.runtime.outputs holds the rules, numpy only)
OUTPUT_KINDS = ("logits", "embedding", "features", "regression")
_NAME = r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$"
_DIM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class InputSpec(_Strict):
    """One model input: name, shape (batch first; ints, or names of symbolic dimensions such as
    ``sequence``, sized in ``model.dims``) and dtype. Integer and bool inputs (token ids, masks)
    are never cast or quantized; ``pad`` fills a symbolic dimension when samples of different
    sizes share a batch (and a fixed-length TFLite model's unused positions)."""

    name: str | None = Field(default=None, pattern=_NAME)
    shape: list[int | str] = Field(min_length=1)
    dtype: Literal["float32", "float16", "uint8", "int8", "int32", "int64", "bool"] = "float32"
    pad: int | float | None = None

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: list[int | str]) -> list[int | str]:
        for d in v:
            if isinstance(d, int) and d <= 0:
                raise ValueError(f"every dimension must be positive, got {v}")
            if isinstance(d, str) and not _DIM.match(d):
                raise ValueError(
                    f"a symbolic dimension must be a name such as 'batch' or 'sequence', got {d!r}"
                )
        return v

    @property
    def symbolic(self) -> dict[int, str]:
        """Symbolic dimensions after the batch: {index: name}."""
        return {i: d for i, d in enumerate(self.shape) if i > 0 and isinstance(d, str)}


class DimSpec(_Strict):
    """The sizes of a symbolic dimension: ``example`` traces and times the model (a typical
    size), ``max`` bounds it (TFLite, which needs a fixed size, is exported at ``max``)."""

    example: int = Field(ge=2)
    max: int | None = Field(default=None, ge=2)
    min: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _order(self) -> DimSpec:
        if self.max is not None and not self.min <= self.example <= self.max:
            raise ValueError(
                f"need min <= example <= max, got {self.min}, {self.example}, {self.max}"
            )
        return self


class OutputSpec(_Strict):
    """One model output (in the order ``forward`` returns them) and what it is: ``logits``
    (class scores: top-1 agreement), ``embedding``/``features`` (vectors: cosine similarity,
    relative L2) or ``regression`` (values: absolute and relative error)."""

    name: str = Field(pattern=_NAME)
    kind: Literal["logits", "embedding", "features", "regression"] = "logits"


class ModelConfig(_Strict):
    """Where the model comes from: a factory plus weights, or a ``.pt2`` ExportedProgram; and its
    inputs (``input``: the one-input shorthand, or ``inputs``), symbolic sizes and outputs."""

    factory: str | None = None
    weights: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    input: InputSpec | None = None
    inputs: list[InputSpec] | None = Field(default=None, min_length=1)
    dims: dict[str, DimSpec] = Field(default_factory=dict)
    outputs: list[OutputSpec] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _source(self) -> ModelConfig:
        if self.factory is None and not (self.weights or "").endswith(".pt2"):
            raise ValueError(
                "give 'factory' (module:callable or file.py:callable), or 'weights' naming a .pt2 file"
            )
        if (self.input is None) == (self.inputs is None):
            raise ValueError(
                "give exactly one of 'input' (one input: {shape, dtype}) or 'inputs' "
                "(a list of {name, shape, dtype})"
            )
        specs = self.input_specs()
        names = [s.name for s in specs]
        if self.inputs is not None and None in names:
            raise ValueError("every entry of 'inputs' needs a 'name' (the forward argument's)")
        if len(set(names)) != len(names):
            raise ValueError(f"input names listed twice: {names}")
        if self.outputs is not None:
            out = [o.name for o in self.outputs]
            if len(set(out)) != len(out):
                raise ValueError(f"output names listed twice: {out}")
            if set(out) & set(names):
                raise ValueError(
                    f"names used for an input and an output: {sorted(set(out) & set(names))}"
                )
        for spec in specs:
            for name in spec.symbolic.values():
                if name not in self.dims:
                    raise ValueError(
                        f"input '{spec.name}' has the symbolic dimension '{name}' but 'dims' does not "
                        f"size it: add dims: {{{name}: {{example: N, max: M}}}}"
                    )
        return self

    def input_specs(self) -> list[InputSpec]:
        """The inputs in forward order; the shorthand ``input`` is named ``input``."""
        if self.inputs is not None:
            return list(self.inputs)
        assert self.input is not None
        if self.input.name is None:
            return [self.input.model_copy(update={"name": "input"})]
        return [self.input]

    @property
    def first_input(self) -> InputSpec:
        """The first input (the only one for most models)."""
        return self.input_specs()[0]


class PreprocessConfig(_Strict):
    """How a raw uint8 HWC image becomes the model's input; stored in every bundle."""

    resize: list[int] | None = Field(default=None, min_length=2, max_length=2)
    scale: float = 1.0 / 255.0
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channels: Literal["RGB", "BGR", "GRAY"] = "RGB"

    @field_validator("std")
    @classmethod
    def _nonzero(cls, v: list[float]) -> list[float]:
        if any(s == 0 for s in v):
            raise ValueError("std values must be non-zero")
        return v


class DataConfig(_Strict):
    """Training, calibration and evaluation data."""

    kind: Literal["fashion-mnist", "image-folder", "npz"] | None = None
    path: str | None = None
    factory: str | None = None
    calibration: int = Field(default=512, ge=1)
    eval: int | None = Field(default=None, ge=1)
    train: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=64, ge=1)
    preprocess: PreprocessConfig | None = None
    labels: list[str] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.kind is None) == (self.factory is None):
            raise ValueError(
                "give exactly one of 'kind' (fashion-mnist, image-folder, npz) or 'factory'"
            )
        if self.kind == "fashion-mnist" and self.path is None:
            self.path = FASHION_MNIST_PATH
        if self.kind in ("image-folder", "npz") and self.path is None:
            raise ValueError(f"data kind '{self.kind}' needs 'path'")
        return self


class ParityTolerance(_Strict):
    """How closely an exported artifact must agree with the PyTorch model.

    Each output is judged by the fields of its kind: ``logits`` by ``top1_agreement`` and
    ``max_abs_diff``; ``embedding``/``features`` by ``mean_cosine``, ``min_cosine`` and
    ``max_rel_l2``; ``regression`` by ``max_rel_l2`` and ``max_abs_error``. A field left out
    takes the default of its kind and precision (``edgesmith.runtime.outputs.DEFAULT_TOLERANCES``).
    """

    top1_agreement: float = Field(default=0.999, ge=0.0, le=1.0)
    max_abs_diff: float | None = Field(default=1e-3, gt=0.0)
    mean_cosine: float | None = Field(default=None, ge=-1.0, le=1.0)
    min_cosine: float | None = Field(default=None, ge=-1.0, le=1.0)
    max_rel_l2: float | None = Field(default=None, gt=0.0)
    max_abs_error: float | None = Field(default=None, gt=0.0)


def _default_parity() -> dict[str, ParityTolerance]:
    return {
        "fp32": ParityTolerance(top1_agreement=0.999, max_abs_diff=1e-3),
        "fp16": ParityTolerance(top1_agreement=0.99, max_abs_diff=5e-2),
        "bf16": ParityTolerance(top1_agreement=0.98, max_abs_diff=2e-1),
        "int8": ParityTolerance(top1_agreement=0.97, max_abs_diff=None),
    }


# defaults of the other output kinds, per precision (logits: ``_default_parity``); an int8 output
# is held to the recipe's metric budget first, so its parity bounds only catch a broken model
_KIND_PARITY: dict[str, dict[str, dict[str, float | None]]] = {
    "embedding": {
        "fp32": {"mean_cosine": 0.99999, "min_cosine": 0.9999, "max_rel_l2": 1e-3},
        "fp16": {"mean_cosine": 0.9999, "min_cosine": 0.999, "max_rel_l2": 2e-2},
        "bf16": {"mean_cosine": 0.999, "min_cosine": 0.99, "max_rel_l2": 0.1},
        "int8": {"mean_cosine": 0.98, "min_cosine": 0.9, "max_rel_l2": None},
    },
    "regression": {
        "fp32": {"max_rel_l2": 1e-3, "max_abs_error": None},
        "fp16": {"max_rel_l2": 2e-2, "max_abs_error": None},
        "bf16": {"max_rel_l2": 0.1, "max_abs_error": None},
        "int8": {"max_rel_l2": 0.1, "max_abs_error": None},
    },
}
_KIND_PARITY["features"] = _KIND_PARITY["embedding"]


def parity_tolerance(
    parity: dict[str, ParityTolerance], precision: str, kind: str = "logits"
) -> dict[str, float | None]:
    """The parity tolerance of an output of ``kind`` in a ``precision`` artifact: the recipe's
    ``parity`` entry (other precisions, such as ``w8``, use ``int8``'s), fields it leaves out
    taking the kind's defaults."""
    tol = parity.get(precision) or parity.get("int8") or ParityTolerance()
    if kind == "logits":
        return {"top1_agreement": tol.top1_agreement, "max_abs_diff": tol.max_abs_diff}
    table = _KIND_PARITY[kind]
    out = dict(table.get(precision) or table["int8"])
    for key in out:
        value = getattr(tol, key)
        if value is not None:
            out[key] = value
    return out


class HeadMemoryConfig(_Strict):
    """``trainable_head.memory``: what the bundle ships so that devices keep the build classes
    when they learn new ones (docs/finetune.md). ``exemplars`` training samples per class are
    chosen by herding among ``pool`` per class; ``holdout`` evaluation samples per class are what
    the held-out gate and the OTA health check measure the old classes on; a fine-tuned head that
    loses more than ``budget`` accuracy there is refused. ``form``: store model inputs or backbone
    features (float16); ``auto`` takes the smaller. ``exemplars: 0, holdout: 0`` ships nothing.
    """

    exemplars: int = Field(default=3, ge=0, le=10_000)
    holdout: int = Field(default=7, ge=0, le=10_000)
    pool: int = Field(default=500, ge=1, le=100_000)
    form: Literal["auto", "inputs", "features"] = "auto"
    budget: float = Field(default=0.02, ge=0, le=1)


class TrainableHeadConfig(_Strict):
    """``trainable_head``: export the model without this head (the backbone) and ship the head as
    arrays, so that devices can fine-tune it (docs/finetune.md).

    ``module`` is the dotted name of the head submodule: an ``nn.Linear``, or an ``nn.Sequential``
    of Linear/ReLU/Dropout (a leading Flatten allowed). ``policy`` says what an OTA update does
    with a head a device fine-tuned: ``keep`` re-applies it onto the new backbone when the
    shapes match, ``replace`` installs the update's head.
    """

    module: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
    policy: Literal["keep", "replace"] = "keep"
    memory: HeadMemoryConfig = Field(default_factory=HeadMemoryConfig)


class StageSpec(BaseModel):
    """One validated entry of ``stages``: the stage name and its typed config."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    config: BaseModel


class Recipe(_Strict):
    """A validated recipe. Relative paths are already resolved against the recipe's folder."""

    version: int = RECIPE_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    model: ModelConfig
    data: DataConfig
    metric: str = "top1"
    target: str | dict[str, Any] = (
        "x86-cpu"  # a profile name, or {profile: NAME, <field>: override}
    )
    seed: int = 0
    stages: list[StageSpec] = Field(default_factory=list)
    export: list[str] = Field(default_factory=lambda: ["onnx"])
    parity: dict[str, ParityTolerance] = Field(default_factory=_default_parity)
    trainable_head: TrainableHeadConfig | None = None
    base_dir: Path | None = Field(default=None, exclude=True)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != RECIPE_VERSION:
            raise ValueError(f"this edgesmith reads recipe version {RECIPE_VERSION}, got {v}")
        return v

    @field_validator("export")
    @classmethod
    def _no_duplicates(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"formats listed twice: {v}")
        return v

    @field_validator("parity", mode="after")
    @classmethod
    def _merge_parity(cls, v: dict[str, ParityTolerance]) -> dict[str, ParityTolerance]:
        # a partial entry overrides only the fields it names: `int8: {top1_agreement: 0.94}` keeps
        # int8's max_abs_diff (none), not the field's generic default
        merged = _default_parity()
        for name, tol in v.items():
            base = merged.get(name)
            merged[name] = (
                tol
                if base is None
                else base.model_copy(update={f: getattr(tol, f) for f in tol.model_fields_set})
            )
        return merged
