"""What the stage commands share: options from the recipe, output checks, preparing, writing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import BaseModel

from edgesmith.checks import Check, failed
from edgesmith.errors import CheckFailed, EdgesmithError
from edgesmith.validation import flag, validate

__all__ = ["check_out", "finish", "make_config", "pct", "prepare", "stage_options"]

M = TypeVar("M", bound=BaseModel)


def stage_options(recipe: Any, name: str) -> dict[str, Any]:
    """The options of the recipe's first stage called ``name`` (empty if there is none)."""
    for spec in recipe.stages:
        if spec.name == name:
            return dict(spec.config.model_dump(exclude_unset=True))
    return {}


def make_config(cls: type[M], base: dict[str, Any], overrides: dict[str, Any]) -> M:
    """``cls(**base | overrides)``; every validation problem is named by its option.

    Raises:
        EdgesmithError: listing each bad option (``--sparsity: ...``).
    """
    merged = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    return validate(cls, merged, source="", hint="see --help for the accepted values", name=flag)


def check_out(out: Path, force: bool) -> None:
    """``out`` is a ``.safetensors`` path that may be written."""
    if out.exists() and not force:
        raise EdgesmithError(f"{out} already exists", hint="pass --force to overwrite it")
    if out.suffix != ".safetensors":
        raise EdgesmithError(
            f"the output must be a .safetensors file, got {out.name}",
            hint="name it e.g. pruned.safetensors",
        )


def prepare(recipe_path: Path) -> Any:
    """The recipe's profile, model, data and metric (``edgesmith.pipeline.prepare``)."""
    from edgesmith.compress.distributed import is_main_process
    from edgesmith.pipeline import prepare as prepare_recipe
    from edgesmith.progress import set_quiet
    from edgesmith.recipe import load_recipe

    if not is_main_process():  # torchrun: rank 0 speaks for all
        set_quiet(True)
    return prepare_recipe(load_recipe(recipe_path))


def finish(
    model: Any, out: Path, as_json: bool, summary: dict[str, Any], stage: str, checks: list[Check]
) -> None:
    """Fail on the stage's failed checks (nothing written), else write ``out`` (rank 0)."""
    from edgesmith.compress.distributed import is_main_process
    from edgesmith.compress.pruning.structure import save_model

    bad = failed(checks)
    if bad:
        raise CheckFailed("; ".join(str(c) for c in bad), hint=f"nothing was written to {out}")
    if not is_main_process():
        return
    save_model(model, out, metadata={f"edgesmith.{stage}": json.dumps(summary, default=str)})
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))


def pct(a: float, b: float) -> str:
    """The change from ``a`` to ``b`` in percent (``+12.0%``)."""
    return f"{(b - a) / a:+.1%}" if a else "n/a"
