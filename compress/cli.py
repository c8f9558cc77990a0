"""Click commands of the compression stages (``edgesmith quantize``, ...).

Each command is self-contained (its imports inside the function) and is registered by name in
``edgesmith.cli.COMMANDS``.
"""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["quantize_cmd"]


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
    help="Calibration samples to use (default: all of data.calibration).",
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
    r = parse_recipe(data, r.base_dir or recipe.parent, source=str(recipe))
    report = build(r, out, force=force, bundle_version=bundle_version, on_failure=_print_summary)
    _print_summary(report)
    echo(f"wrote {out}/report.md, {out}/report.json and {len(report['artifacts'])} bundle(s)")
