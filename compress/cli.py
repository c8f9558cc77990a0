"""``edgesmith prune``, ``distill`` and ``quantize``: one compression stage at a time.

``prune`` and ``distill`` read a recipe (model, data, seed, target profile), run one stage and
write the model as ``.safetensors`` weights that the recipe's factory loads back (pruned layer
widths travel in the file's metadata): ``model.weights: pruned.safetensors``. Under torchrun, rank
0 writes. ``quantize`` runs the recipe's quantize stage alone and writes a build folder.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import click

from edgesmith.errors import EdgesmithError
from edgesmith.progress import echo

__all__ = ["distill_cmd", "prune_cmd", "quantize_cmd"]

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _stage_options(recipe: Any, name: str) -> dict[str, Any]:
    """The options of the recipe's first stage called ``name`` (empty if there is none)."""
    for spec in recipe.stages:
        if spec.name == name:
            return dict(spec.config.model_dump(exclude_unset=True))
    return {}


def _config(cls: Any, base: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """``cls(**base | overrides)``; a validation problem becomes one line naming the option."""
    from pydantic import ValidationError

    merged = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return cls(**merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "options"
        got = (
            f" (got {err['input']!r})"
            if "input" in err and not isinstance(err["input"], dict) and "got " not in err["msg"]
            else ""
        )
        raise EdgesmithError(
            f"{where}: {err['msg'].removeprefix('Value error, ')}{got}",
            hint="see --help for the accepted values",
        ) from None


def _round_to(value: str | None) -> int | str | None:
    if value is None or value.strip() in ("0", "auto"):
        return None if value is None or value.strip() == "0" else "auto"
    try:
        return int(value)
    except ValueError:
        raise EdgesmithError(
            f"--round-to must be auto, 0 or a positive integer, got '{value}'",
            hint="e.g. --round-to 16",
        ) from None


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise EdgesmithError(f"{out} already exists", hint="pass --force to overwrite it")
    if out.suffix != ".safetensors":
        raise EdgesmithError(
            f"the output must be a .safetensors file, got {out.name}",
            hint="name it e.g. pruned.safetensors",
        )


def _prepare(recipe_path: Path) -> Any:
    from edgesmith.compress.distributed import is_main_process
    from edgesmith.pipeline import prepare
    from edgesmith.progress import set_quiet
    from edgesmith.recipe import load_recipe

    if not is_main_process():  # torchrun: rank 0 speaks for all
        set_quiet(True)
    return prepare(load_recipe(recipe_path))


def _finish(
    ctx: Any, out: Path, as_json: bool, summary: dict[str, Any], stage: str, checks: list[Any]
) -> None:
    """Fail on the stage's failed checks (nothing written), else write ``out`` (rank 0)."""
    from edgesmith.checks import failed
    from edgesmith.compress.distributed import is_main_process
    from edgesmith.compress.pruning.structure import save_model
    from edgesmith.errors import CheckFailed

    bad = failed(checks)
    if bad:
        raise CheckFailed("; ".join(c.detail for c in bad), hint=f"nothing was written to {out}")
    if not is_main_process():
        return
    save_model(ctx.model, out, metadata={f"edgesmith.{stage}": json.dumps(summary, default=str)})
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))


def _pct(a: float, b: float) -> str:
    return f"{(b - a) / a:+.1%}" if a else "n/a"


# --------------------------------------------------------------------------- prune


@click.command("prune")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Pruned weights to write (.safetensors).",
)
@click.option(
    "--sparsity",
    type=float,
    help="Fraction of MACs to remove, in (0, 1) (unstructured: of weights to zero).",
)
@click.option(
    "--latency-ms",
    type=float,
    help="Instead: batch-1 ONNX Runtime latency budget (ms) on the target profile.",
)
@click.option(
    "--method", type=click.Choice(["structured", "unstructured"]), help="Default: structured."
)
@click.option(
    "--importance",
    type=click.Choice(["l1", "l2", "bn_scale", "taylor"]),
    help="Channel ranking (default l2).",
)
@click.option(
    "--scope",
    type=click.Choice(["layer", "global"]),
    help="Same fraction per layer (default), or ranked across layers.",
)
@click.option(
    "--round-to",
    help="Channel counts multiple of this: auto (default: 16 with AVX-512, else 8), N, or 0 (free).",
)
@click.option(
    "--ignore",
    multiple=True,
    help="Layer (name or glob) whose width is kept; repeatable. The output layer always is.",
)
@click.option("--keep-first", is_flag=True, default=None, help="Keep the first layer's width too.")
@click.option(
    "--steps", type=click.IntRange(min=1), help="Reach the target in this many steps (default 1)."
)
@click.option(
    "--finetune-epochs", type=float, help="Fine-tune this long after each step (default 0)."
)
@click.option("--force", is_flag=True, help="Overwrite OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the stage's report row as JSON.")
def prune_cmd(
    recipe: Path,
    out: Path,
    sparsity: float | None,
    latency_ms: float | None,
    method: str | None,
    importance: str | None,
    scope: str | None,
    round_to: str | None,
    ignore: tuple[str, ...],
    keep_first: bool | None,
    steps: int | None,
    finetune_epochs: float | None,
    force: bool,
    as_json: bool,
) -> None:
    """Prune RECIPE's model and write the smaller model's weights to OUT.

    Options default to the recipe's prune stage, if it has one. Load the result with the
    recipe's factory: set `model.weights: OUT` (the pruned widths are stored in the file).

    \b
    Examples:
      edgesmith prune recipe.yaml --sparsity 0.5 -o pruned.safetensors
      edgesmith prune recipe.yaml --latency-ms 0.2 --finetune-epochs 0.5 -o fast.safetensors
    """
    from edgesmith.compress.prune import Prune, PruneConfig
    from edgesmith.measure import count_macs, model_size_bytes
    from edgesmith.recipe import load_recipe

    _check_out(out, force)
    base = _stage_options(load_recipe(recipe), "prune")
    if (
        sparsity is not None or latency_ms is not None
    ):  # a target on the command line replaces the recipe's
        base.pop("sparsity", None)
        base.pop("latency_ms", None)
    cfg = _config(
        PruneConfig,
        base,
        {
            "sparsity": sparsity,
            "latency_ms": latency_ms,
            "method": method,
            "importance": importance,
            "scope": scope,
            "round_to": _round_to(round_to),
            "ignore": list(ignore) or None,
            "keep_first": keep_first,
            "steps": steps,
            "finetune_epochs": finetune_epochs,
        },
    )
    if round_to is not None and round_to.strip() == "0":
        cfg = cfg.model_copy(update={"round_to": None})
    p = _prepare(recipe)
    with tempfile.TemporaryDirectory(prefix="edgesmith-prune-") as tmp:
        from edgesmith.pipeline import new_context

        ctx = new_context(p, Path(tmp))
        acc0 = ctx.evaluate(ctx.model)
        macs0, size0 = count_macs(ctx.model, p.example), model_size_bytes(ctx.model)
        result = Prune(cfg).run(ctx)
        row = result.row
        acc1 = ctx.evaluate(ctx.model)
        macs1, size1 = count_macs(ctx.model, p.example), model_size_bytes(ctx.model)
        summary = {
            "recipe": str(recipe),
            "accuracy_before": acc0,
            "accuracy": acc1,
            "macs_before": macs0,
            "macs": macs1,
            "size_bytes_before": size0,
            "size_bytes": size1,
            **row,
        }
        _finish(ctx, out, as_json, summary, "prune", result.checks)
    echo(
        f"{out}: MACs {macs0 / 1e6:.2f} M -> {macs1 / 1e6:.2f} M ({_pct(macs0, macs1)}), "
        f"size {size0 / 1e3:.0f} kB -> {size1 / 1e3:.0f} kB, accuracy {acc0:.4f} -> {acc1:.4f} "
        f"(on {len(p.data.eval)} samples; distill or fine-tune next)"
    )
    if cfg.method == "unstructured":
        echo(
            f"note: unstructured zeros keep every MAC and the dense size; deflate-compressed weights "
            f"{row['compressed_bytes_before'] / 1e3:.0f} kB -> {row['compressed_bytes'] / 1e3:.0f} kB"
        )


# --------------------------------------------------------------------------- distill


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
    if value.endswith(_WEIGHT_SUFFIXES) or value.endswith(".pt2"):
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
    from edgesmith.recipe import _resolve_ref

    return {
        "factory": _resolve_ref(value, Path.cwd()),
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
@click.option("--epochs", type=float, help="Epochs (default 3).")
@click.option("--temperature", type=float, help="Softmax temperature (default 4).")
@click.option("--alpha", type=float, help="Weight of the teacher loss in [0, 1] (default 0.7).")
@click.option("--lr", type=float, help="Peak learning rate (default 1e-3, cosine decay).")
@click.option("--batch-size", type=int, help="Global batch size (default 64).")
@click.option("--patience", type=int, help="Early stopping: epochs without improvement.")
@click.option(
    "--hint",
    "hints",
    multiple=True,
    help="Feature-hint layer, 'name' or 'student:teacher'; repeatable.",
)
@click.option("--hint-weight", type=float, help="Weight of the hint loss (default 1).")
@click.option("--seed", type=int, help="Seed (default: the recipe's).")
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
    from edgesmith.compress.distill import DistillConfig, distill, load_model_spec
    from edgesmith.compress.distributed import is_main_process
    from edgesmith.compress.train import CHECKPOINT_NAME
    from edgesmith.measure import count_macs
    from edgesmith.recipe import load_recipe

    _check_out(out, force)
    r = load_recipe(recipe)
    base = _stage_options(r, "distill")
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
    cfg = _config(
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
    p = _prepare(recipe)
    shape = r.model.input.shape
    # command-line paths are absolute by now; the recipe's own stage options are relative to it
    student_model = load_model_spec(cfg.student, r.base_dir, shape) if cfg.student else p.model
    teacher_model = load_model_spec(cfg.teacher, r.base_dir, shape) if cfg.teacher else p.model
    with tempfile.TemporaryDirectory(prefix="edgesmith-distill-") as tmp:
        from edgesmith.pipeline import new_context

        ctx = new_context(p, Path(tmp))
        acc_t = ctx.evaluate(teacher_model)
        acc_s0 = ctx.evaluate(student_model)
        result = distill(
            student_model,
            teacher_model,
            p.data.train,
            cfg,
            p.example,
            evaluate=ctx.evaluate,
            checkpoint_dir=ckpt_dir,
            resume=resume,
            seed=r.seed if cfg.seed is None else cfg.seed,
        )
        ctx.model = student_model
        acc = ctx.evaluate(student_model)
        summary = {
            "recipe": str(recipe),
            "teacher_accuracy": acc_t,
            "student_accuracy_before": acc_s0,
            "accuracy": acc,
            "teacher_macs": count_macs(teacher_model, p.example),
            "macs": count_macs(student_model, p.example),
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
        _finish(ctx, out, as_json, summary, "distill", checks)
    if is_main_process():
        echo(
            f"{out}: student accuracy {acc_s0:.4f} -> {acc:.4f} (teacher {acc_t:.4f}, {acc - acc_t:+.4f}) "
            f"on {len(p.data.eval)} samples; {result.epochs_run} epoch(s), world size {result.world_size}; "
            f"checkpoints in {ckpt_dir}"
        )


# --------------------------------------------------------------------------- quantize


@click.command("quantize")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option(
    "-f",
    "--format",
    "formats",
    multiple=True,
    help="Format to quantize (repeatable; default: the recipe's 'export').",
)
@click.option(
    "--max-accuracy-drop",
    type=float,
    default=None,
    help="Largest tolerated absolute drop of the recipe's metric, e.g. 0.005 (half a point).",
)
@click.option(
    "-p",
    "--precision",
    "precisions",
    multiple=True,
    type=click.Choice(["int8", "w8", "fp16", "bf16"]),
    help="Variant to derive (repeatable; default int8).",
)
@click.option(
    "--calibration-samples",
    type=click.IntRange(min=1),
    default=None,
    help="Calibration samples to use, at least 32 (default: all of data.calibration).",
)
@click.option(
    "--calibration-method",
    type=click.Choice(["minmax", "percentile", "entropy", "mse"]),
    default=None,
    help="Activation range estimation (default minmax).",
)
@click.option("--target", default=None, help="Device profile (overrides the recipe's 'target').")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--bundle-version", type=click.IntRange(min=1), default=None)
def quantize_cmd(
    recipe: Path,
    out: Path,
    formats: tuple[str, ...],
    max_accuracy_drop: float | None,
    precisions: tuple[str, ...],
    calibration_samples: int | None,
    calibration_method: str | None,
    target: str | None,
    force: bool,
    bundle_version: int | None,
) -> None:
    """Quantize RECIPE's model to int8 for every format, within an accuracy budget.

    Runs only the quantize stage (options from the recipe's 'quantize' entry, overridden by
    these flags): export, calibration with each format's own tool, the search for the fewest
    float layers, parity and accuracy checks, bundles and a report in OUT. Exit 1 (nothing
    written, the best result printed) when the budget cannot be met.

    \b
    Example:
      edgesmith quantize examples/fashion_mnist/recipe.yaml -o out/q --max-accuracy-drop 0.005
    """
    from edgesmith.cli import _print_summary
    from edgesmith.pipeline import build
    from edgesmith.progress import echo
    from edgesmith.recipe import dump_recipe, load_recipe, parse_recipe

    r = load_recipe(recipe)
    data = dump_recipe(r)
    options: dict[str, object] = {}
    for stage in data.get("stages", []):
        if "quantize" in stage:
            options = dict(stage["quantize"])
    overrides = {
        "max_accuracy_drop": max_accuracy_drop,
        "precisions": list(precisions) or None,
        "calibration_samples": calibration_samples,
        "calibration_method": calibration_method,
    }
    options.update({k: v for k, v in overrides.items() if v is not None})
    skipped = [next(iter(s)) for s in data.get("stages", []) if "quantize" not in s]
    if skipped:
        echo(f"quantize runs only the quantize stage; skipping {', '.join(skipped)}")
    data["stages"] = [{"quantize": options}]
    if formats:
        data["export"] = list(dict.fromkeys(formats))
    if target:
        data["target"] = target
    # problems may come from these flags, not the file: say so in the error's source
    r = parse_recipe(data, r.base_dir or recipe.parent, source=f"{recipe} with the given options")
    report = build(r, out, force=force, bundle_version=bundle_version, on_failure=_print_summary)
    if report is None:  # a torchrun rank other than 0
        return
    _print_summary(report)
    echo(f"wrote {out}/report.md, {out}/report.json and {len(report['artifacts'])} bundle(s)")
