"""The recipe's schema: pydantic models of every section (DESIGN.md section 9).

Import-light (pydantic only): the stages, the exporters and the data loaders use these types
without pulling in the recipe loader (``edgesmith.recipe``), which sits above them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "DTYPES",
    "FASHION_MNIST_PATH",
    "RECIPE_VERSION",
    "DataConfig",
    "HeadMemoryConfig",
    "InputSpec",
    "ModelConfig",
    "ParityTolerance",
    "PreprocessConfig",
    "Recipe",
    "StageSpec",
    "TrainableHeadConfig",
]

RECIPE_VERSION = 1
FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
DTYPES = ("float32", "float16", "uint8", "int8", "int32", "int64")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class InputSpec(_Strict):
    """Shape and dtype of the model's example input (batch dimension first)."""

    shape: list[int] = Field(min_length=1)
    dtype: Literal["float32", "float16", "uint8", "int8", "int32", "int64"] = "float32"

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(d <= 0 for d in v):
            raise ValueError(f"every dimension must be positive, got {v}")
        return v


class ModelConfig(_Strict):
    """Where the model comes from: a factory plus weights, or a ``.pt2`` ExportedProgram."""

    factory: str | None = None
    weights: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    input: InputSpec

    @model_validator(mode="after")
    def _source(self) -> ModelConfig:
        if self.factory is None and not (self.weights or "").endswith(".pt2"):
            raise ValueError(
                "give 'factory' (module:callable or file.py:callable), or 'weights' naming a .pt2 file"
            )
        return self


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
    """How closely an exported artifact must agree with the PyTorch model."""

    top1_agreement: float = Field(default=0.999, ge=0.0, le=1.0)
    max_abs_diff: float | None = Field(default=1e-3, gt=0.0)


def _default_parity() -> dict[str, ParityTolerance]:
    return {
        "fp32": ParityTolerance(top1_agreement=0.999, max_abs_diff=1e-3),
        "fp16": ParityTolerance(top1_agreement=0.99, max_abs_diff=5e-2),
        "bf16": ParityTolerance(top1_agreement=0.98, max_abs_diff=2e-1),
        "int8": ParityTolerance(top1_agreement=0.97, max_abs_diff=None),
    }


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
