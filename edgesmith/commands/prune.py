"""``edgesmith prune``: prune a recipe's model and write the smaller model's weights."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from edgesmith.commands._common import check_out, finish, make_config, pct, prepare, stage_options
from edgesmith.commands.options import field_option
from edgesmith.compress.prune import PruneConfig
from edgesmith.errors import EdgesmithError
from edgesmith.progress import echo

__all__ = ["prune_cmd"]


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


@click.command("prune")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Pruned weights to write (.safetensors).",
)
@field_option(
    PruneConfig,
    "sparsity",
    help="Fraction of MACs to remove, in (0, 1) (unstructured: of weights to zero).",
)
@field_option(
    PruneConfig,
    "latency_ms",
    help="Instead: batch-1 ONNX Runtime latency budget (ms) on the target profile.",
)
@field_option(PruneConfig, "method", help="Default: structured.")
@field_option(PruneConfig, "importance", help="Channel ranking (default l2).")
@field_option(
    PruneConfig, "scope", help="Same fraction per layer (default), or ranked across layers."
)
@click.option(  # auto, 0 or N: a union the recipe writes as `auto`, null or an integer
    "--round-to",
    help="Channel counts multiple of this: auto (default: 16 with AVX-512, else 8), N, or 0 (free).",
)
@field_option(
    PruneConfig,
    "ignore",
    help="Layer (name or glob) whose width is kept; repeatable. The output layer always is.",
)
@field_option(PruneConfig, "keep_first", help="Keep the first layer's width too.")
@field_option(PruneConfig, "steps", help="Reach the target in this many steps (default 1).")
@field_option(
    PruneConfig, "finetune_epochs", help="Fine-tune this long after each step (default 0)."
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
    from edgesmith.compress.prune import Prune
    from edgesmith.measure import count_macs, model_size_bytes
    from edgesmith.pipeline import new_context
    from edgesmith.recipe import load_recipe

    check_out(out, force)
    base = stage_options(load_recipe(recipe), "prune")
    if sparsity is not None or latency_ms is not None:  # a target given here replaces the recipe's
        base.pop("sparsity", None)
        base.pop("latency_ms", None)
    cfg = make_config(
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
    p = prepare(recipe)
    with tempfile.TemporaryDirectory(prefix="edgesmith-prune-") as tmp:
        ctx = new_context(p, Path(tmp))
        acc0 = ctx.evaluate(ctx.model)
        macs0, size0 = count_macs(ctx.model, p.examples), model_size_bytes(ctx.model)
        result = Prune(cfg).run(ctx)
        row = result.row
        acc1 = ctx.evaluate(ctx.model)
        macs1, size1 = count_macs(ctx.model, p.examples), model_size_bytes(ctx.model)
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
        finish(ctx.model, out, as_json, summary, "prune", result.checks)
    echo(
        f"{out}: MACs {macs0 / 1e6:.2f} M -> {macs1 / 1e6:.2f} M ({pct(macs0, macs1)}), "
        f"size {size0 / 1e3:.0f} kB -> {size1 / 1e3:.0f} kB, accuracy {acc0:.4f} -> {acc1:.4f} "
        f"(on {len(p.data.eval)} samples; distill or fine-tune next)"
    )
    if cfg.method == "unstructured":
        echo(
            f"note: unstructured zeros keep every MAC and the dense size; deflate-compressed weights "
            f"{row['compressed_bytes_before'] / 1e3:.0f} kB -> {row['compressed_bytes'] / 1e3:.0f} kB"
        )
