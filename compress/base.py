"""The stage protocol: a config model plus ``run(ctx) -> ctx`` (DESIGN.md section 2)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # torch stays out of the import path of the recipe checker
    import torch

    from edgesmith.data import Datasets
    from edgesmith.recipe import Recipe

__all__ = ["Context", "Stage", "StageConfig", "StageRecord"]


class StageConfig(BaseModel):
    """Base of every stage's options; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class StageRecord:
    """One row of ``report.json["stages"]``."""

    name: str
    accuracy: float
    macs: int
    size_bytes: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "accuracy": self.accuracy,
            "macs": self.macs,
            "size_bytes": self.size_bytes,
            "seconds": round(self.seconds, 3),
            **self.extra,
        }


@dataclass
class Context:
    """What flows through the stages of a build.

    Attributes:
        recipe: the validated recipe.
        model: the current PyTorch model; stages replace or edit it.
        teacher: the model as loaded, before any stage (a frozen copy).
        data: training, calibration and evaluation sets.
        example_input: one batch-1 input tensor for tracing and export.
        evaluate: ``evaluate(model) -> float`` on the evaluation set with the recipe's metric.
        work_dir: a private folder for checkpoints and intermediate files.
        history: one record per finished stage.
        extra: stage-to-exporter notes, e.g. the int8 settings a quantize stage chose.
        artifact_hooks: callables run on every exported fp32 artifact; each may derive new
            artifacts (quantized variants) from it.
    """

    recipe: Recipe
    model: torch.nn.Module
    teacher: torch.nn.Module
    data: Datasets
    example_input: torch.Tensor
    evaluate: Callable[[torch.nn.Module], float]
    work_dir: Path
    profile: dict[str, Any] = field(default_factory=dict)
    history: list[StageRecord] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    artifact_hooks: list[Callable[..., list[Any]]] = field(default_factory=list)


class Stage:
    """A compression stage. Subclasses set ``name`` and ``config_cls`` and implement ``run``."""

    name: ClassVar[str]
    config_cls: ClassVar[type[StageConfig]] = StageConfig

    def __init__(self, config: StageConfig) -> None:
        self.config = config

    def run(self, ctx: Context) -> Context:
        """Transform ``ctx.model`` (or register artifact hooks) and return the context."""
        raise NotImplementedError
