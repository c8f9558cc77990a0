"""The recipe: a YAML file that says what to build (DESIGN.md section 9).

Parsed with a safe loader and validated with pydantic; every problem is reported with its key
path, its line number and, for a misspelt key, the nearest known key. The schema (the pydantic
models) is in ``edgesmith.schema``, the error reporting in ``edgesmith.validation``; this module
loads, checks names against the registries (stages, formats, targets) and resolves paths.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgesmith.errors import RecipeError
from edgesmith.refs import absolute_path, absolute_ref
from edgesmith.schema import (
    DTYPES,
    FASHION_MNIST_PATH,
    OUTPUT_KINDS,
    RECIPE_VERSION,
    DataConfig,
    DimSpec,
    HeadMemoryConfig,
    InputSpec,
    ModelConfig,
    OutputSpec,
    ParityTolerance,
    PreprocessConfig,
    Recipe,
    StageSpec,
    TrainableHeadConfig,
)
from edgesmith.validation import Problem, problems_from_error, raise_problems
from edgesmith.validation import dotted as _dotted
from edgesmith.validation import line_of as _line_of
from edgesmith.yamlutil import Loc, load_yaml_with_lines

__all__ = [
    "DTYPES",
    "FASHION_MNIST_PATH",
    "OUTPUT_KINDS",
    "RECIPE_VERSION",
    "DataConfig",
    "DimSpec",
    "HeadMemoryConfig",
    "InputSpec",
    "ModelConfig",
    "OutputSpec",
    "ParityTolerance",
    "PreprocessConfig",
    "Recipe",
    "StageSpec",
    "TrainableHeadConfig",
    "dump_recipe",
    "load_recipe",
    "parse_recipe",
]

RECIPE_HINT = "see `edgesmith recipe init` for a commented template"


def _format_errors(
    exc: ValidationError, lines: dict[Loc, int], root: type[Any], prefix: Loc = ()
) -> list[Problem]:
    return problems_from_error(exc, root, lines, prefix)


def _raise(source: str, problems: list[Problem]) -> typing.NoReturn:
    raise_problems(source, problems, hint=RECIPE_HINT)


# --------------------------------------------------------------------------- loading


# relative paths in a recipe resolve against its folder (edgesmith.refs, shared with the stages)
_resolve_ref = absolute_ref
_resolve_path = absolute_path


_QUANT_STAGES = ("quantize", "qat")


def _validate_stages(raw: Any, lines: dict[Loc, int]) -> tuple[list[StageSpec], list[Problem]]:
    from edgesmith.compress import STAGES

    specs: list[StageSpec] = []
    where: list[int] = []  # the recipe index of each spec
    problems: list[Problem] = []
    if raw is None:
        return specs, problems
    if not isinstance(raw, list):
        return specs, [
            (
                _line_of(lines, ("stages",)),
                "'stages' must be a list",
                "write e.g. '- prune: {sparsity: 0.5}'",
            )
        ]
    for i, item in enumerate(raw):
        line = _line_of(lines, ("stages", i))
        if isinstance(item, str):
            item = {item: None}
        if not isinstance(item, dict) or len(item) != 1:
            problems.append(
                (
                    line,
                    f"stages[{i}] must be one 'name: {{options}}' entry",
                    "write e.g. '- prune: {sparsity: 0.5}'",
                )
            )
            continue
        ((name, options),) = item.items()
        if name not in STAGES:
            close = difflib.get_close_matches(str(name), list(STAGES), n=1, cutoff=0.6)
            known = ", ".join(sorted(STAGES)) or "(none installed)"
            hint = (f"did you mean '{close[0]}'? " if close else "") + f"known stages: {known}"
            problems.append((line, f"unknown stage '{name}'", hint))
            continue
        if options is None:
            options = {}
        if not isinstance(options, dict):
            problems.append(
                (line, f"options of stage '{name}' must be a mapping, got {options!r}", None)
            )
            continue
        config_cls = STAGES[name].config_cls
        try:
            specs.append(StageSpec(name=name, config=config_cls.model_validate(options)))
            where.append(i)
        except ValidationError as exc:
            problems += _format_errors(exc, lines, config_cls, prefix=("stages", i, name))
    # quantization is applied to the exported files after every stage, so it must come last, once
    quant = [k for k, spec in enumerate(specs) if spec.name in _QUANT_STAGES]
    if len(quant) > 1:
        k = quant[1]
        problems.append(
            (
                _line_of(lines, ("stages", where[k])),
                f"'{specs[k].name}' after '{specs[quant[0]].name}': give one quantization stage",
                "qat already quantizes after fine-tuning; keep either quantize or qat",
            )
        )
    elif quant:
        later = [
            k for k in range(quant[0] + 1, len(specs)) if specs[k].name in ("prune", "distill")
        ]
        if later:
            k = later[0]
            problems.append(
                (
                    _line_of(lines, ("stages", where[k])),
                    f"'{specs[k].name}' after '{specs[quant[0]].name}': quantization must be the last stage",
                    f"move '{specs[quant[0]].name}' after '{specs[k].name}'",
                )
            )
    return specs, problems


def _check_calibration(
    raw_stages: Any, specs: list[StageSpec], formats: Any, lines: dict[Loc, int]
) -> list[Problem]:
    """An int8 calibration method every exported format implements (else it fails after export)."""
    from edgesmith.compress.quantize.config import CALIBRATION_SUPPORT

    problems: list[Problem] = []
    formats = [f for f in formats if isinstance(f, str)] if isinstance(formats, list) else []
    for spec in specs:
        method = getattr(spec.config, "calibration_method", None)
        if method is None or "int8" not in getattr(spec.config, "precisions", ["int8"]):
            continue
        bad = [
            f for f in formats if f in CALIBRATION_SUPPORT and method not in CALIBRATION_SUPPORT[f]
        ]
        if not bad:
            continue
        index = next(
            (i for i, s in enumerate(raw_stages or []) if isinstance(s, dict) and spec.name in s),
            None,
        )
        loc: Loc = ("stages", index, spec.name, "calibration_method") if index is not None else ()
        known = [f for f in formats if f in CALIBRATION_SUPPORT]
        usable = [
            m
            for m in CALIBRATION_SUPPORT[bad[0]]
            if all(m in CALIBRATION_SUPPORT[f] for f in known)
        ]
        problems.append(
            (
                _line_of(lines, loc),
                f"calibration_method '{method}' of stage '{spec.name}' is not supported for "
                + ", ".join(f"{f} (it supports {', '.join(CALIBRATION_SUPPORT[f])})" for f in bad),
                (f"use calibration_method: {' or '.join(usable)}, or" if usable else "")
                + f" drop {', '.join(bad)} from 'export'",
            )
        )
    return problems


def _check_names(data: dict[str, Any], lines: dict[Loc, int]) -> list[Problem]:
    """Target profile and export formats must be known names; checked on the raw mapping."""
    from edgesmith.export import EXPORTERS
    from edgesmith.runtime.profiles import list_profiles

    problems: list[Problem] = []
    target = data.get("target")
    profiles = list_profiles()
    if isinstance(target, dict):
        from edgesmith.errors import EdgesmithError
        from edgesmith.runtime.profiles import resolve_target

        try:
            resolve_target(target)
        except EdgesmithError as exc:
            problems.append((_line_of(lines, ("target",)), f"target: {exc.message}", exc.hint))
    elif isinstance(target, str) and target not in profiles:
        close = difflib.get_close_matches(target, profiles, n=1, cutoff=0.5)
        problems.append(
            (
                _line_of(lines, ("target",)),
                f"unknown target '{target}'",
                (f"did you mean '{close[0]}'? " if close else "")
                + f"known targets: {', '.join(profiles)}",
            )
        )
    formats = data.get("export")
    for i, fmt in enumerate(formats if isinstance(formats, list) else []):
        if isinstance(fmt, str) and fmt not in EXPORTERS:
            close = difflib.get_close_matches(fmt, list(EXPORTERS), n=1, cutoff=0.5)
            problems.append(
                (
                    _line_of(lines, ("export", i)),
                    f"unknown export format '{fmt}'",
                    (f"did you mean '{close[0]}'? " if close else "")
                    + f"known formats: {', '.join(EXPORTERS)}",
                )
            )
    metric = data.get("metric")
    if isinstance(metric, str) and ":" not in metric and metric not in ("top1", "top5"):
        problems.append(
            (
                _line_of(lines, ("metric",)),
                f"unknown metric '{metric}'",
                "use top1, top5, or 'module:function' taking (outputs, targets) -> float",
            )
        )
    return problems


def _check_model_io(recipe: Recipe, lines: dict[Loc, int]) -> list[Problem]:
    """Inputs, outputs and metric fit together: a built-in (top-1/top-5) metric needs logits, and
    TFLite, which needs fixed sizes, needs every symbolic dimension's ``max``."""
    problems: list[Problem] = []
    model = recipe.model
    if recipe.metric in ("top1", "top5") and model.outputs:
        first = model.outputs[0]
        if first.kind != "logits":
            problems.append(
                (
                    _line_of(lines, ("model", "outputs", 0, "kind")),
                    f"metric '{recipe.metric}' needs class logits, but output '{first.name}' is "
                    f"declared kind: {first.kind}",
                    "give a 'module:function' metric taking (outputs, targets) -> float (e.g. mean "
                    "cosine for embeddings), or declare the output kind: logits",
                )
            )
    if "tflite" in recipe.export:
        for name, dim in model.dims.items():
            if dim.max is None:
                problems.append(
                    (
                        _line_of(lines, ("model", "dims", name)),
                        f"dims.{name} has no 'max': TFLite models have fixed sizes and are exported "
                        f"at the largest one",
                        f"add max to dims.{name} (e.g. {{example: {dim.example}, max: "
                        f"{max(dim.example * 4, 8)}}}), or drop tflite from 'export'",
                    )
                )
    return problems


def parse_recipe(
    data: Any, base_dir: Path, source: str = "recipe", lines: dict[Loc, int] | None = None
) -> Recipe:
    """Validate an already-parsed recipe mapping; relative paths resolve against ``base_dir``.

    Raises:
        RecipeError: listing every problem with its line, key path and a fix.
    """
    lines = lines or {}
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: a recipe must be a YAML mapping (name:, model:, data:, ...), got {type(data).__name__}",
            hint="see `edgesmith recipe init` for a commented template",
        )
    data = dict(data)
    raw_stages = data.pop("stages", None)
    problems: list[Problem] = []
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems += _format_errors(exc, lines, Recipe)
    specs, stage_problems = _validate_stages(raw_stages, lines)
    problems += stage_problems + _check_names(data, lines)
    problems += _check_calibration(raw_stages, specs, data.get("export", ["onnx"]), lines)
    if recipe is not None:
        problems += _check_model_io(recipe, lines)
    if problems or recipe is None:
        _raise(source, problems)
    recipe.stages = specs
    base = base_dir.resolve()
    recipe.base_dir = base

    def resolve(loc: Loc, value: str | None, ref: bool = False) -> str | None:
        if value is None:
            return None
        try:  # a NUL byte, '~nosuchuser' or a symbolic-link loop cannot name a file
            if "\0" in value:
                raise ValueError("it contains a NUL byte")
            return _resolve_ref(value, base) if ref else _resolve_path(value, base)
        except (ValueError, RuntimeError, OSError) as exc:
            _raise(
                source,
                [(_line_of(lines, loc), f"'{_dotted(loc)}': cannot use {value!r}: {exc}", None)],
            )

    if recipe.model.factory:
        recipe.model.factory = resolve(("model", "factory"), recipe.model.factory, ref=True)
    recipe.model.weights = resolve(("model", "weights"), recipe.model.weights)
    recipe.data.path = resolve(("data", "path"), recipe.data.path)
    if recipe.data.factory:
        recipe.data.factory = resolve(("data", "factory"), recipe.data.factory, ref=True)
    if ":" in recipe.metric:
        recipe.metric = str(resolve(("metric",), recipe.metric, ref=True))
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read, validate and resolve a recipe file.

    Raises:
        RecipeError: with ``file:line: key path: problem`` and a hint.

    Example:
        >>> recipe = load_recipe("examples/fashion_mnist/recipe.yaml")  # doctest: +SKIP
        >>> recipe.model.input.shape
        [1, 1, 28, 28]
    """
    path = Path(path)
    data, lines = load_yaml_with_lines(path)
    return parse_recipe(data, path.parent, source=str(path), lines=lines)


def dump_recipe(recipe: Recipe) -> dict[str, Any]:
    """A plain mapping of the recipe that ``parse_recipe`` reads back to an equal recipe."""
    out = recipe.model_dump(mode="json", exclude={"stages", "base_dir"})
    # keys a one-input classifier recipe leaves unset are left out (the dump of such a recipe is
    # what it was before multi-input models; parse_recipe reads both)
    model = out["model"]
    for key, empty in (("input", None), ("inputs", None), ("dims", {}), ("outputs", None)):
        if model.get(key) == empty:
            model.pop(key, None)
    for spec in [model.get("input"), *(model.get("inputs") or [])]:
        for key in ("name", "pad"):
            if spec is not None and spec.get(key) is None:
                spec.pop(key, None)
    for tol in out.get("parity", {}).values():
        for key in ("mean_cosine", "min_cosine", "max_rel_l2", "max_abs_error"):
            if tol.get(key) is None:
                tol.pop(key, None)
    out["stages"] = [{s.name: _stage_dump(s.config)} for s in recipe.stages]
    return out


# stage keys added for multi-input models, left out of a dump at their default (as model keys
# above): a classifier recipe's dump stays what it was
_NEW_STAGE_DEFAULTS = {"loss": "auto", "mode": "auto"}


def _stage_dump(config: Any) -> dict[str, Any]:
    out = config.model_dump(mode="json")
    for key, default in _NEW_STAGE_DEFAULTS.items():
        if out.get(key) == default and key not in config.model_fields_set:
            out.pop(key)
    return out
