"""The ``distill`` stage: knowledge distillation from a teacher into the (pruned) student.

Recipe contract (DESIGN.md section 9): ``- distill: {epochs: 3, temperature: 4.0, alpha: 0.7}``.
For class logits the loss is ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``;
for other outputs (``model.outputs`` kinds) a feature loss: ``1 - cosine(s, t)`` for embeddings,
mean squared error (relative to the teacher's mean square) for features and regression values,
``alpha`` again weighing the teacher against the targets; several outputs add their losses. Plus
``hint_weight * MSE(adapter(student feature), teacher feature)`` for every pair in ``hints``
(FitNets); an adapter (1x1 convolution or linear layer, with pooling when the spatial sizes
differ) is created automatically when the widths differ and dropped after training.

Options::

    - distill:
        epochs: 3
        temperature: 4.0
        alpha: 0.7                 # weight of the soft (teacher) loss; 1 - alpha on the labels
        loss: auto                 # auto (by output kind) | kl | cosine | mse
        lr: 0.001
        batch_size: 64             # global batch (split across torchrun processes)
        optimizer: adamw           # adamw | adam | sgd
        patience: 2                # early stopping on the evaluation metric (best epoch kept)
        hints: [features]          # layer names, or "student_layer:teacher_layer"
        hint_weight: 1.0
        teacher: {factory: ..., weights: ..., kwargs: {}}   # default: the model before any stage
        student: {factory: ..., weights: ..., kwargs: {}}   # default: the current (pruned) model
        checkpoint_dir: ckpt/      # default: the build's work folder; checkpoints every epoch
        resume: false              # continue from checkpoint_dir/last.pt
        max_accuracy_drop: 0.005   # fail the build if the student is further below the model as
                                   # the recipe loaded it (the default teacher; edgesmith.checks)
        bn_batches: 20             # BatchNorm statistics recomputed on this many batches per epoch
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgesmith.checks import accuracy_budget
from edgesmith.compress.base import Context, Stage, StageConfig, StageResult, register_stage
from edgesmith.compress.losses import (
    _outputs,
    _target,
    feature_loss,
    kd_loss,
    output_loss,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from edgesmith.schema import ModelConfig

__all__ = [
    "Distill",
    "DistillConfig",
    "ModelSpec",
    "distill",
    "feature_loss",
    "kd_loss",
    "model_config",
    "output_loss",
]


class ModelSpec(BaseModel):
    """A model given in a stage's options: a factory (``file.py:fn`` or ``pkg.mod:fn``) and weights."""

    model_config = ConfigDict(extra="forbid")

    factory: str | None = None
    weights: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _source(self) -> ModelSpec:
        if self.factory is None and not (self.weights or "").endswith(".pt2"):
            raise ValueError("give 'factory' (plus 'weights'), or 'weights' naming a .pt2 file")
        return self


class DistillConfig(StageConfig):
    """Options of the ``distill`` stage (see the module docstring)."""

    epochs: float = Field(default=3, gt=0)
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.7, ge=0, le=1)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=64, ge=1)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = Field(default=0.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    patience: int | None = Field(default=None, ge=1)
    min_delta: float = Field(default=0.0, ge=0)
    hints: list[str] = Field(default_factory=list)
    hint_weight: float = Field(default=1.0, ge=0)
    teacher: ModelSpec | None = None
    student: ModelSpec | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    max_steps_per_epoch: int | None = Field(default=None, ge=1)
    bn_batches: int = Field(default=20, ge=0)
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    loss: Literal["auto", "kl", "cosine", "mse"] = "auto"


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple | list) else out


def _args(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def _split_hint(hint: str) -> tuple[str, str]:
    s, _, t = hint.partition(":")
    return s, (t or s)


def _capture(model: nn.Module, names: list[str], store: dict[str, Any], role: str) -> list[Any]:
    from edgesmith.errors import CompressionError

    modules = dict(model.named_modules())
    hooks = []
    for name in names:
        if name not in modules:
            import difflib

            close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
            raise CompressionError(
                f"hint layer '{name}' is not a layer of the {role} ({type(model).__name__})",
                hint=(f"did you mean {', '.join(close)}? " if close else "")
                + "write hints as 'layer' or 'student_layer:teacher_layer'",
            )

        def hook(m: Any, i: Any, o: Any, name: str = name) -> None:
            store[name] = _first(o)

        hooks.append(modules[name].register_forward_hook(hook))
    return hooks


def _adapter(s: torch.Tensor, t: torch.Tensor, pair: str) -> nn.Module:
    """A module mapping a student feature to the teacher feature's shape."""
    from torch import nn

    from edgesmith.errors import CompressionError

    if s.shape == t.shape:
        return nn.Identity()
    if s.dim() != t.dim() or s.dim() not in (2, 3, 4):
        raise CompressionError(
            f"hint {pair}: cannot match student feature {list(s.shape)} to teacher feature {list(t.shape)}",
            hint="pair layers whose outputs have the same rank (both (N, C, H, W), (N, L, C) or (N, C))",
        )
    if s.dim() == 4:
        layers: list[nn.Module] = [nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False)]
        if s.shape[2:] != t.shape[2:]:
            layers.append(nn.AdaptiveAvgPool2d(tuple(t.shape[2:])))
        return nn.Sequential(*layers)
    if s.dim() == 3 and s.shape[1] != t.shape[1]:
        raise CompressionError(
            f"hint {pair}: sequence lengths differ ({s.shape[1]} vs {t.shape[1]})",
            hint="pair layers with the same number of tokens or time steps",
        )
    return nn.Linear(s.shape[-1], t.shape[-1], bias=False)


class _StudentWithAdapters:
    """Builds the trainable module: the student plus hint adapters (one DDP unit)."""

    @staticmethod
    def build(student: nn.Module, adapters: dict[str, nn.Module], names: list[str]) -> nn.Module:
        from torch import nn

        class Trainable(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.student = student
                self.adapters = nn.ModuleDict({str(i): adapters[n] for i, n in enumerate(names)})
                self.store: dict[str, Any] = {}
                self.names = names
                self.hooks = _capture(student, names, self.store, "student")

            def forward(self, *x: Any) -> Any:
                self.store.clear()
                out = self.student(*x)
                feats = [self.adapters[str(i)](self.store[n]) for i, n in enumerate(self.names)]
                return out, feats

            def close(self) -> None:
                for h in self.hooks:
                    h.remove()

        return Trainable()


def model_config(spec: ModelSpec, base_dir: Path | None, template: Any) -> ModelConfig:
    """The recipe model section of a :class:`ModelSpec` (paths relative to ``base_dir``), which
    ``edgesmith.models.build_model`` (``ctx.load_model``) instantiates, pruned structure included.
    ``template``: the recipe's model section (inputs, dims, outputs are kept), or an input shape."""
    from edgesmith.refs import absolute_path, absolute_ref
    from edgesmith.schema import InputSpec, ModelConfig

    base = base_dir or Path.cwd()
    source = {
        "factory": absolute_ref(spec.factory, base) if spec.factory else None,
        "weights": absolute_path(spec.weights, base),
        "kwargs": spec.kwargs,
    }
    if isinstance(template, ModelConfig):
        return template.model_copy(update=source)
    return ModelConfig(**source, input=InputSpec(shape=template))


def check_teacher(teacher: nn.Module, student: nn.Module, example: Any) -> None:
    """Both models run on ``example`` (one tensor, or a tuple: one per input) and their outputs
    have the same number and shapes.

    Raises:
        CompressionError: naming both shapes.
    """
    import torch

    from edgesmith.errors import CompressionError

    args = _args(example)
    outs = []
    for role, m in (("teacher", teacher), ("student", student)):
        m.eval()
        try:
            with torch.no_grad():
                outs.append(_outputs(m(*args)))
        except Exception as exc:
            shapes = ", ".join(str(list(a.shape)) for a in args)
            raise CompressionError(
                f"the {role} ({type(m).__name__}) cannot run the model input {shapes}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                hint=f"give a {role} that takes the recipe's input",
            ) from None
    t_outs, s_outs = outs
    if len(t_outs) != len(s_outs):
        raise CompressionError(
            f"the teacher returns {len(t_outs)} outputs but the student {len(s_outs)}: "
            "distillation matches outputs one to one",
            hint="use a teacher with the same outputs as the student",
        )
    for t, s in zip(t_outs, s_outs, strict=True):
        if t.shape != s.shape:
            raise CompressionError(
                f"the teacher's output has shape {list(t.shape)} but the student's has "
                f"{list(s.shape)}: distillation matches outputs one to one",
                hint="use a teacher trained on the same classes (same output layout) as the student",
            )


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_set: Any,
    cfg: DistillConfig,
    example: Any,
    *,
    evaluate: Any = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    seed: int = 0,
    kinds: tuple[str, ...] = ("logits",),
    names: list[str] | None = None,
    collate_fn: Any = None,
) -> Any:
    """Distill ``teacher`` into ``student`` in place; returns the :class:`~edgesmith.compress.train.FitResult`.

    ``kinds`` (per output: ``logits``, ``embedding``, ``features``, ``regression``) choose each
    output's loss unless ``cfg.loss`` forces one; ``names`` address dict targets.

    Raises:
        CompressionError: mismatching outputs, unknown hint layers, a foreign checkpoint.
    """
    import torch
    import torch.nn.functional as F

    from edgesmith.compress.train import FitConfig, fit

    check_teacher(teacher, student, example)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    pairs = [_split_hint(h) for h in cfg.hints]
    s_names, t_names = [s for s, _ in pairs], [t for _, t in pairs]
    t_store: dict[str, Any] = {}
    t_hooks = _capture(teacher, t_names, t_store, "teacher")
    s_store: dict[str, Any] = {}
    s_hooks = _capture(student, s_names, s_store, "student")
    torch.manual_seed(seed)
    with torch.no_grad():
        student.eval()
        student(*_args(example))
        teacher(*_args(example))
    adapters = {s: _adapter(s_store[s], t_store[t], f"'{s}:{t}'") for s, t in pairs}
    for h in s_hooks:
        h.remove()
    trainable = _StudentWithAdapters.build(student, adapters, s_names)
    dev_holder: dict[str, Any] = {}

    losses = [cfg.loss if cfg.loss != "auto" else k for k in kinds]
    out_names = list(names or [])

    def loss_fn(out: Any, x: Any, y: Any) -> tuple[torch.Tensor, Any]:
        s_out, feats = out
        args = _args(x)
        if "dev" not in dev_holder or dev_holder["dev"] != args[0].device:
            teacher.to(args[0].device)
            dev_holder["dev"] = args[0].device
        with torch.no_grad():
            t_outs = _outputs(teacher(*args))
        s_outs = _outputs(s_out)
        n = len(s_outs)
        loss = sum(
            output_loss(
                losses[i] if i < len(losses) else "logits",
                s_outs[i],
                t_outs[i],
                _target(y, i, n, out_names),
                cfg.temperature,
                cfg.alpha,
            )
            for i in range(n)
        )
        for f, t_name in zip(feats, t_names, strict=True):
            loss = loss + cfg.hint_weight * F.mse_loss(f, t_store[t_name])
        logits = s_outs[0] if losses and losses[0] in ("logits", "kl") else None
        return loss, logits

    try:
        result = fit(
            trainable,
            train_set,
            loss_fn,
            FitConfig(
                epochs=cfg.epochs,
                lr=cfg.lr,
                batch_size=cfg.batch_size,
                optimizer=cfg.optimizer,
                weight_decay=cfg.weight_decay,
                schedule=cfg.schedule,
                patience=cfg.patience,
                min_delta=cfg.min_delta,
                seed=seed,
                device=cfg.device,
                max_steps_per_epoch=cfg.max_steps_per_epoch,
                bn_batches=cfg.bn_batches,
            ),
            evaluate=(lambda m: evaluate(m.student)) if evaluate else None,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            description="distill",
            collate_fn=collate_fn,
        )
    finally:
        trainable.close()
        for h in t_hooks:
            h.remove()
        teacher.to("cpu")
    student.eval()
    return result


@register_stage
class Distill(Stage):
    """Knowledge distillation (see :class:`DistillConfig`)."""

    name = "distill"
    config_cls = DistillConfig

    def run(self, ctx: Context) -> StageResult:
        cfg = self.config
        assert isinstance(cfg, DistillConfig)
        t0 = time.perf_counter()
        base = ctx.recipe.base_dir
        shape = ctx.recipe.model
        teacher = ctx.teacher
        if cfg.teacher is not None or cfg.student is not None:
            load = ctx.load_model
            if load is None:
                from edgesmith.errors import CompressionError

                raise CompressionError(
                    "distill: this build cannot load the 'teacher'/'student' models it names",
                    hint="give the stage's context a load_model (edgesmith.models.build_model)",
                )
            if cfg.teacher is not None:
                teacher = load(model_config(cfg.teacher, base, shape))
            if cfg.student is not None:
                ctx.model = load(model_config(cfg.student, base, shape))
        ckpt_dir = (
            (base or Path.cwd()) / cfg.checkpoint_dir
            if cfg.checkpoint_dir
            else ctx.work_dir / "distill"
        )
        seed = ctx.recipe.seed if cfg.seed is None else cfg.seed
        result = distill(
            ctx.model,
            teacher,
            ctx.data.train,
            cfg,
            ctx.example_args,
            evaluate=ctx.evaluate,
            checkpoint_dir=ckpt_dir,
            resume=cfg.resume,
            seed=seed,
            kinds=tuple(ctx.output_kinds),
            names=list(ctx.output_names),
            collate_fn=getattr(ctx.data, "collate", None),
        )
        row: dict[str, Any] = {
            "temperature": cfg.temperature,
            "alpha": cfg.alpha,
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "world_size": result.world_size,
            "train_seconds": round(result.seconds, 2),
            "history": result.history,
        }
        if result.resumed_from is not None:
            row["resumed_from_epoch"] = result.resumed_from
        out = StageResult(row)
        if cfg.max_accuracy_drop is not None:
            teacher_acc = ctx.evaluate(teacher)
            acc = result.best_metric if result.best_metric is not None else ctx.evaluate(ctx.model)
            row["teacher_accuracy"] = teacher_acc
            # the budget counts from the model as the recipe loaded it (edgesmith.checks)
            reference = teacher_acc if teacher is ctx.teacher else ctx.evaluate(ctx.teacher)
            out.checks.append(accuracy_budget("distill", reference, acc, cfg.max_accuracy_drop))
        row["distill_seconds"] = round(time.perf_counter() - t0, 2)
        return out
