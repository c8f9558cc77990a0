"""The stage protocol: a config model plus ``run(ctx) -> StageResult`` (DESIGN.md section 2).

A stage edits ``ctx.model`` (or registers artifact hooks) and returns its report row and its
checks; an artifact hook returns the artifacts it derived and its checks. Nothing travels as
sentences in ``ctx.extra``: the build decides from the :class:`~edgesmith.checks.Check` fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from edgesmith.checks import Check

if TYPE_CHECKING:  # torch stays out of the import path of the recipe checker
    import torch

    from edgesmith.data import Datasets
    from edgesmith.export.evaluate import Artifact, Evaluator
    from edgesmith.schema import ModelConfig, Recipe

__all__ = [
    "STAGES",
    "ArtifactHook",
    "Context",
    "HookResult",
    "Stage",
    "StageConfig",
    "StageRecord",
    "StageResult",
    "register_stage",
]


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
class StageResult:
    """What ``Stage.run`` returns: the stage's fields of its report row, and its checks."""

    row: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)


@dataclass
class HookResult:
    """What an artifact hook returns: the artifacts it derived (evaluated), and its checks."""

    artifacts: list[Artifact] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)


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
        extra: free-form notes between the build and third-party stages.
        artifact_hooks: ``hook(ctx, fp32_artifact, evaluator) -> HookResult``, run on every
            exported fp32 artifact; each may derive new artifacts (quantized variants) from it.
        load_model: builds a model from a recipe model section (``edgesmith.models.build_model``,
            given by the build: the stages sit below the model loader), for stage options that
            name other models (distill's ``teacher``/``student``).
        example_inputs: one batch-1 tensor per model input (``example_input`` is the first one
            for a one-input model, else this tuple).
        output_kinds / output_names: what each model output is (``logits``, ``embedding``,
            ``features``, ``regression``: it picks the training loss and the parity rules) and
            its name (dict targets and metric outputs are keyed by it).
        layouts: the recipe's inputs (``edgesmith.feeds.InputLayout``: names, dtypes, pad values).
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
    artifact_hooks: list[ArtifactHook] = field(default_factory=list)
    load_model: Callable[[ModelConfig], torch.nn.Module] | None = None
    example_inputs: tuple[Any, ...] = ()
    output_kinds: tuple[str, ...] = ("logits",)
    output_names: tuple[str, ...] = ("output",)
    layouts: list[Any] = field(default_factory=list)

    @property
    def example_args(self) -> tuple[Any, ...]:
        """The example as positional model arguments: ``model(*ctx.example_args)``."""
        if self.example_inputs:
            return tuple(self.example_inputs)
        x = self.example_input
        return tuple(x) if isinstance(x, tuple | list) else (x,)


ArtifactHook = Callable[["Context", "Artifact", "Evaluator"], HookResult]


class Stage:
    """A compression stage. Subclasses set ``name`` and ``config_cls`` and implement ``run``."""

    name: ClassVar[str]
    config_cls: ClassVar[type[StageConfig]] = StageConfig

    def __init__(self, config: StageConfig) -> None:
        self.config = config

    def run(self, ctx: Context) -> StageResult:
        """Transform ``ctx.model`` (or register artifact hooks); return the row and the checks."""
        raise NotImplementedError


# recipe stage name -> class; filled by register_stage (built-ins) and by entry points
STAGES: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: add a stage to ``STAGES`` under ``cls.name``."""
    STAGES[cls.name] = cls
    return cls
