"""``edgesmith distill``: distill a teacher into a student and write the student's weights."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import click

from edgesmith.commands._common import check_out, finish, make_config, prepare, stage_options
from edgesmith.commands.options import field_option
from edgesmith.compress.distill import DistillConfig
from edgesmith.errors import EdgesmithError
from edgesmith.progress import echo

__all__ = ["distill_cmd"]

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".pt2")


def _model_spec(
    value: str | None, weights: str | None, kwargs: str | None, option: str
) -> dict[str, Any] | None:
    """A ModelSpec mapping from command-line values: a weights file, or file.py:fn / pkg.mod:fn."""
    if value is None:
        return None
    kw: dict[str, Any] = {}
    if kwargs:
        try:
            kw = json.loads(kwargs)
        except json.JSONDecodeError as exc:
            raise EdgesmithError(
                f"--{option}-kwargs is not JSON: {exc}", hint="e.g. '{\"width\": 16}'"
            ) from None
        if not isinstance(kw, dict):
            raise EdgesmithError(
                f"--{option}-kwargs must be a JSON object", hint="e.g. '{\"width\": 16}'"
            )
    if value.endswith(_WEIGHT_SUFFIXES):
        if weights:
            raise EdgesmithError(
                f"--{option} names a weights file; --{option}-weights is for a factory",
                hint=f"give --{option} file.py:Factory --{option}-weights w.safetensors",
            )
        return {"weights": str(Path(value).resolve()), "kwargs": kw, "_recipe_factory": True}
    if ":" not in value:
        raise EdgesmithError(
            f"--{option} must be a weights file or a factory (file.py:fn or pkg.mod:fn), got '{value}'",
            hint=f"e.g. --{option} pruned.safetensors",
        )
    from edgesmith.refs import absolute_ref

    return {
        "factory": absolute_ref(value, Path.cwd()),
        "weights": str(Path(weights).resolve()) if weights else None,
        "kwargs": kw,
    }


@click.command("distill")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Student weights to write (.safetensors).",
)
@click.option(
    "--student",
    help="Student: weights for the recipe's factory (e.g. pruned.safetensors), or file.py:Factory.",
)
@click.option("--student-weights", help="Weights for a --student factory.")
@click.option("--student-kwargs", help="JSON keyword arguments for a --student factory.")
@click.option(
    "--teacher",
    help="Teacher (default: the recipe's model): weights for the recipe's factory, or file.py:Factory.",
)
@click.option("--teacher-weights", help="Weights for a --teacher factory.")
@click.option("--teacher-kwargs", help="JSON keyword arguments for a --teacher factory.")
@field_option(DistillConfig, "epochs", help="Epochs (default 3).")
@field_option(DistillConfig, "temperature", help="Softmax temperature (default 4).")
@field_option(DistillConfig, "alpha", help="Weight of the teacher loss in [0, 1] (default 0.7).")
@field_option(DistillConfig, "lr", help="Peak learning rate (default 1e-3, cosine decay).")
@field_option(DistillConfig, "batch_size", help="Global batch size (default 64).")
@field_option(DistillConfig, "patience", help="Early stopping: epochs without improvement.")
@field_option(
    DistillConfig,
    "hints",
    "--hint",
    help="Feature-hint layer, 'name' or 'student:teacher'; repeatable.",
)
@field_option(DistillConfig, "hint_weight", help="Weight of the hint loss (default 1).")
@field_option(DistillConfig, "seed", help="Seed (default: the recipe's).")
@click.option(
    "--checkpoint-dir",
    type=click.Path(path_type=Path),
    help="Checkpoints (default: OUT with .ckpt instead of .safetensors).",
)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --checkpoint-dir.")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the stage's report row as JSON.")
def distill_cmd(
    recipe: Path,
    out: Path,
    student: str | None,
    student_weights: str | None,
    student_kwargs: str | None,
    teacher: str | None,
    teacher_weights: str | None,
    teacher_kwargs: str | None,
    epochs: float | None,
    temperature: float | None,
    alpha: float | None,
    lr: float | None,
    batch_size: int | None,
    patience: int | None,
    hints: tuple[str, ...],
    hint_weight: float | None,
    seed: int | None,
    checkpoint_dir: Path | None,
    resume: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Distill a teacher (default: RECIPE's model) into a student and write it to OUT.

    A checkpoint is written after every epoch; after a crash, rerun with --resume (also on
    another number of torchrun processes).

    \b
    Examples:
      edgesmith distill recipe.yaml --student pruned.safetensors -o distilled.safetensors
      torchrun --nproc-per-node 2 -m edgesmith distill recipe.yaml --student pruned.safetensors -o d.safetensors
    """
    from edgesmith.checks import accuracy_budget
    from edgesmith.compress.distill import distill, model_config
    from edgesmith.compress.distributed import is_main_process
    from edgesmith.compress.train import CHECKPOINT_NAME
    from edgesmith.measure import count_macs
    from edgesmith.models import build_model
    from edgesmith.pipeline import new_context
    from edgesmith.recipe import load_recipe

    check_out(out, force)
    r = load_recipe(recipe)
    base = stage_options(r, "distill")
    specs = {}
    for role, value, w, kw in (
        ("student", student, student_weights, student_kwargs),
        ("teacher", teacher, teacher_weights, teacher_kwargs),
    ):
        spec = _model_spec(value, w, kw, role)
        if spec is not None and spec.pop("_recipe_factory", False):
            spec = {
                "factory": r.model.factory,
                "weights": spec["weights"],
                "kwargs": r.model.kwargs,
            }
        specs[role] = spec
    if specs["student"] is None and "student" not in base:
        raise EdgesmithError(
            "no student given",
            hint="pass --student pruned.safetensors (weights for the recipe's model) or --student file.py:Factory",
        )
    ckpt_dir = checkpoint_dir or out.with_suffix(".ckpt")
    if (ckpt_dir / CHECKPOINT_NAME).exists() and not resume:
        raise EdgesmithError(
            f"{ckpt_dir / CHECKPOINT_NAME} exists from an earlier run",
            hint="pass --resume to continue it, or --checkpoint-dir to start elsewhere",
        )
    cfg = make_config(
        DistillConfig,
        {k: v for k, v in base.items() if k not in ("checkpoint_dir", "resume")},
        {
            "epochs": epochs,
            "temperature": temperature,
            "alpha": alpha,
            "lr": lr,
            "batch_size": batch_size,
            "patience": patience,
            "hints": list(hints) or None,
            "hint_weight": hint_weight,
            "seed": seed,
            "student": specs["student"],
            "teacher": specs["teacher"],
        },
    )
    p = prepare(recipe)
    shape = r.model

    def load(spec: Any) -> Any:
        # command-line paths are absolute by now; the recipe's own stage options are relative to it
        return build_model(model_config(spec, r.base_dir, shape)) if spec else p.model

    student_model, teacher_model = load(cfg.student), load(cfg.teacher)
    with tempfile.TemporaryDirectory(prefix="edgesmith-distill-") as tmp:
        ctx = new_context(p, Path(tmp))
        acc_t = ctx.evaluate(teacher_model)
        acc_s0 = ctx.evaluate(student_model)
        result = distill(
            student_model,
            teacher_model,
            p.data.train,
            cfg,
            p.examples,
            evaluate=ctx.evaluate,
            checkpoint_dir=ckpt_dir,
            resume=resume,
            seed=r.seed if cfg.seed is None else cfg.seed,
            kinds=tuple(p.outputs.kinds),
            names=list(p.outputs.names),
            collate_fn=p.data.collate,
        )
        acc = ctx.evaluate(student_model)
        summary = {
            "recipe": str(recipe),
            "teacher_accuracy": acc_t,
            "student_accuracy_before": acc_s0,
            "accuracy": acc,
            "teacher_macs": count_macs(teacher_model, p.examples),
            "macs": count_macs(student_model, p.examples),
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "resumed_from_epoch": result.resumed_from,
            "world_size": result.world_size,
            "seconds": round(result.seconds, 2),
            "history": result.history,
        }
        checks = []
        if cfg.max_accuracy_drop is not None:
            # the budget counts from the recipe's model as loaded (edgesmith.checks)
            reference = acc_t if teacher_model is p.model else ctx.evaluate(ctx.teacher)
            checks.append(accuracy_budget("distill", reference, acc, cfg.max_accuracy_drop))
        finish(student_model, out, as_json, summary, "distill", checks)
    if is_main_process():
        echo(
            f"{out}: student accuracy {acc_s0:.4f} -> {acc:.4f} (teacher {acc_t:.4f}, {acc - acc_t:+.4f}) "
            f"on {len(p.data.eval)} samples; {result.epochs_run} epoch(s), world size {result.world_size}; "
            f"checkpoints in {ckpt_dir}"
        )
