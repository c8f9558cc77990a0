"""``edgesmith quantize``: run a recipe's quantize stage alone and write a build folder."""

from __future__ import annotations

from pathlib import Path

import click

from edgesmith.commands.options import field_option
from edgesmith.compress.quantize.config import QuantizeConfig
from edgesmith.progress import echo

__all__ = ["quantize_cmd"]


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
@field_option(
    QuantizeConfig,
    "max_accuracy_drop",
    help="Largest tolerated absolute drop of the recipe's metric, e.g. 0.005 (half a point).",
)
@field_option(
    QuantizeConfig,
    "precisions",
    "-p",
    "--precision",
    help="Variant to derive (repeatable; default int8).",
)
@field_option(
    QuantizeConfig,
    "calibration_samples",
    help="Calibration samples to use, at least 32 (default: all of data.calibration).",
)
@field_option(
    QuantizeConfig, "calibration_method", help="Activation range estimation (default minmax)."
)
@field_option(
    QuantizeConfig,
    "require_speedup",
    help="Fail when an int8 model is not faster than the best float option on this machine.",
)
@click.option("--target", default=None, help="Device profile (overrides the recipe's 'target').")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--bundle-version", type=click.IntRange(min=1), default=None)
@click.option(
    "--keep-going",
    is_flag=True,
    help="Write the formats that met their checks when others did not (partial, exit 1).",
)
def quantize_cmd(
    recipe: Path,
    out: Path,
    formats: tuple[str, ...],
    max_accuracy_drop: float | None,
    precisions: tuple[str, ...],
    calibration_samples: int | None,
    calibration_method: str | None,
    require_speedup: bool | None,
    target: str | None,
    force: bool,
    bundle_version: int | None,
    keep_going: bool,
) -> None:
    """Quantize RECIPE's model to int8 for every format, within an accuracy budget.

    Runs only the quantize stage (options from the recipe's 'quantize' entry, overridden by
    these flags): export, calibration with each format's own tool, the search for the fewest
    float layers, parity and accuracy checks, bundles and a report in OUT. Exit 1 (nothing
    written, the best result printed) when the budget cannot be met; with --keep-going the
    formats that met it are written (a partial report) and the exit status is still 1.

    \b
    Example:
      edgesmith quantize examples/fashion_mnist/recipe.yaml -o out/q --max-accuracy-drop 0.005
    """
    from edgesmith.pipeline import build
    from edgesmith.recipe import dump_recipe, load_recipe, parse_recipe
    from edgesmith.report import print_summary

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
        "require_speedup": require_speedup,
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
    report = build(
        r,
        out,
        force=force,
        bundle_version=bundle_version,
        on_failure=print_summary,
        keep_going=keep_going,
    )
    if report is None:  # a torchrun rank other than 0
        return
    print_summary(report)
    echo(f"wrote {out}/report.md, {out}/report.json and {len(report['artifacts'])} bundle(s)")
