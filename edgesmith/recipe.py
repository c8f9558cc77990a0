"""The recipe: a YAML file that says what to build (DESIGN.md section 9).

Parsed with a safe loader and validated with pydantic; every problem is reported with its key
path, its line number and, for a misspelt key, the nearest known key.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgesmith.errors import RecipeError
from edgesmith.yamlutil import Loc, load_yaml_with_lines

__all__ = [
    "DataConfig",
    "HeadMemoryConfig",
    "InputSpec",
    "ModelConfig",
    "ParityTolerance",
    "PreprocessConfig",
    "Recipe",
    "StageSpec",
    "TrainableHeadConfig",
    "dump_recipe",
    "load_recipe",
    "parse_recipe",
]

RECIPE_VERSION = 1
FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
DTYPES = ("float32", "float16", "uint8", "int8", "int32", "int64")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class InputSpec(_Strict):
    """Shape and dtype of the model's example input (batch dimension first)."""

    shape: list[int] = Field(min_length=1)
    dtype: Literal["float32", "float16", "uint8", "int8", "int32", "int64"] = "float32"

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(d <= 0 for d in v):
            raise ValueError(f"every dimension must be positive, got {v}")
        return v


class ModelConfig(_Strict):
    """Where the model comes from: a factory plus weights, or a ``.pt2`` ExportedProgram."""

    factory: str | None = None
    weights: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    input: InputSpec

    @model_validator(mode="after")
    def _source(self) -> ModelConfig:
        if self.factory is None and not (self.weights or "").endswith(".pt2"):
            raise ValueError(
                "give 'factory' (module:callable or file.py:callable), or 'weights' naming a .pt2 file"
            )
        return self


class PreprocessConfig(_Strict):
    """How a raw uint8 HWC image becomes the model's input; stored in every bundle."""

    resize: list[int] | None = Field(default=None, min_length=2, max_length=2)
    scale: float = 1.0 / 255.0
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channels: Literal["RGB", "BGR", "GRAY"] = "RGB"

    @field_validator("std")
    @classmethod
    def _nonzero(cls, v: list[float]) -> list[float]:
        if any(s == 0 for s in v):
            raise ValueError("std values must be non-zero")
        return v


class DataConfig(_Strict):
    """Training, calibration and evaluation data."""

    kind: Literal["fashion-mnist", "image-folder", "npz"] | None = None
    path: str | None = None
    factory: str | None = None
    calibration: int = Field(default=512, ge=1)
    eval: int | None = Field(default=None, ge=1)
    train: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=64, ge=1)
    preprocess: PreprocessConfig | None = None
    labels: list[str] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.kind is None) == (self.factory is None):
            raise ValueError(
                "give exactly one of 'kind' (fashion-mnist, image-folder, npz) or 'factory'"
            )
        if self.kind == "fashion-mnist" and self.path is None:
            self.path = FASHION_MNIST_PATH
        if self.kind in ("image-folder", "npz") and self.path is None:
            raise ValueError(f"data kind '{self.kind}' needs 'path'")
        return self


class ParityTolerance(_Strict):
    """How closely an exported artifact must agree with the PyTorch model."""

    top1_agreement: float = Field(default=0.999, ge=0.0, le=1.0)
    max_abs_diff: float | None = Field(default=1e-3, gt=0.0)


def _default_parity() -> dict[str, ParityTolerance]:
    return {
        "fp32": ParityTolerance(top1_agreement=0.999, max_abs_diff=1e-3),
        "fp16": ParityTolerance(top1_agreement=0.99, max_abs_diff=5e-2),
        "bf16": ParityTolerance(top1_agreement=0.98, max_abs_diff=2e-1),
        "int8": ParityTolerance(top1_agreement=0.97, max_abs_diff=None),
    }


class HeadMemoryConfig(_Strict):
    """``trainable_head.memory``: what the bundle ships so that devices keep the build classes
    when they learn new ones (docs/finetune.md). ``exemplars`` training samples per class are
    chosen by herding among ``pool`` per class; ``holdout`` evaluation samples per class are what
    the held-out gate and the OTA health check measure the old classes on; a fine-tuned head that
    loses more than ``budget`` accuracy there is refused. ``form``: store model inputs or backbone
    features (float16); ``auto`` takes the smaller. ``exemplars: 0, holdout: 0`` ships nothing.
    """

    exemplars: int = Field(default=3, ge=0, le=10_000)
    holdout: int = Field(default=7, ge=0, le=10_000)
    pool: int = Field(default=500, ge=1, le=100_000)
    form: Literal["auto", "inputs", "features"] = "auto"
    budget: float = Field(default=0.02, ge=0, le=1)


class TrainableHeadConfig(_Strict):
    """``trainable_head``: export the model without this head (the backbone) and ship the head as
    arrays, so that devices can fine-tune it (docs/finetune.md).

    ``module`` is the dotted name of the head submodule: an ``nn.Linear``, or an ``nn.Sequential``
    of Linear/ReLU/Dropout (a leading Flatten allowed). ``policy`` says what an OTA update does
    with a head a device fine-tuned: ``keep`` re-applies it onto the new backbone when the
    shapes match, ``replace`` installs the update's head.
    """

    module: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
    policy: Literal["keep", "replace"] = "keep"
    memory: HeadMemoryConfig = Field(default_factory=HeadMemoryConfig)


class StageSpec(BaseModel):
    """One validated entry of ``stages``: the stage name and its typed config."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    config: BaseModel


class Recipe(_Strict):
    """A validated recipe. Relative paths are already resolved against the recipe's folder."""

    version: int = RECIPE_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    model: ModelConfig
    data: DataConfig
    metric: str = "top1"
    target: str | dict[str, Any] = (
        "x86-cpu"  # a profile name, or {profile: NAME, <field>: override}
    )
    seed: int = 0
    stages: list[StageSpec] = Field(default_factory=list)
    export: list[str] = Field(default_factory=lambda: ["onnx"])
    parity: dict[str, ParityTolerance] = Field(default_factory=_default_parity)
    trainable_head: TrainableHeadConfig | None = None
    base_dir: Path | None = Field(default=None, exclude=True)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != RECIPE_VERSION:
            raise ValueError(f"this edgesmith reads recipe version {RECIPE_VERSION}, got {v}")
        return v

    @field_validator("export")
    @classmethod
    def _no_duplicates(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"formats listed twice: {v}")
        return v

    @field_validator("parity", mode="after")
    @classmethod
    def _merge_parity(cls, v: dict[str, ParityTolerance]) -> dict[str, ParityTolerance]:
        # a partial entry overrides only the fields it names: `int8: {top1_agreement: 0.94}` keeps
        # int8's max_abs_diff (none), not the field's generic default
        merged = _default_parity()
        for name, tol in v.items():
            base = merged.get(name)
            merged[name] = (
                tol
                if base is None
                else base.model_copy(update={f: getattr(tol, f) for f in tol.model_fields_set})
            )
        return merged


# --------------------------------------------------------------------------- error reporting


def _unwrap(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside Optional[...]/list[...]/dict[..., X], if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, dict):
        for arg in typing.get_args(annotation):
            found = _unwrap(arg)
            if found is not None:
                return found
    return None


def _fields_at(root: type[BaseModel], loc: Loc) -> list[str]:
    cls: type[BaseModel] | None = root
    for part in loc:
        if cls is None:
            return []
        if isinstance(part, int) or part not in cls.model_fields:
            continue
        cls = _unwrap(cls.model_fields[part].annotation)
    return list(cls.model_fields) if cls is not None else []


def _line_of(lines: dict[Loc, int], loc: Loc) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


Problem = tuple[int | None, str, str | None]  # (line, what is wrong, how to fix it)


def _is_type_tag(part: str | int) -> bool:
    """pydantic puts the tried member of a union into the error location ('str', 'dict[str,any]')."""
    return isinstance(part, str) and (
        part.startswith("function-")
        or "[" in part
        or part in ("str", "int", "float", "bool", "none")
    )


def _format_errors(
    exc: ValidationError, lines: dict[Loc, int], root: type[BaseModel], prefix: Loc = ()
) -> list[Problem]:
    problems: list[Problem] = []
    union_msgs: dict[Loc, list[str]] = {}
    union_input: dict[Loc, Any] = {}
    for err in exc.errors():
        raw_loc = tuple(err["loc"])
        loc: Loc = prefix + tuple(p for p in raw_loc if not _is_type_tag(p))
        if any(_is_type_tag(p) and not str(p).startswith("function-") for p in raw_loc):
            # one error per union member: merge them into "expected A or B"
            union_msgs.setdefault(loc, []).append(err["msg"].removeprefix("Input should be "))
            union_input[loc] = err.get("input")
            continue
        hint = None
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            known = [k for k in _fields_at(root, loc[len(prefix) : -1]) if k != "base_dir"]
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            msg = f"unknown key '{_dotted(loc)}'"
            if close:
                hint = f"did you mean '{close[0]}'?"
            elif known:
                hint = f"known keys here: {', '.join(known)}"
        elif err["type"] == "missing":
            msg = f"missing required key '{_dotted(loc)}'"
        else:
            text = err["msg"].removeprefix("Value error, ")
            got = "" if "got " in text else _got(err.get("input"))  # validators may name it already
            msg = f"'{_dotted(loc)}': {text}{got}"
        problems.append((_line_of(lines, loc), msg, hint))
    for loc, msgs in union_msgs.items():
        msg = (
            f"'{_dotted(loc)}': expected {' or '.join(dict.fromkeys(msgs))}{_got(union_input[loc])}"
        )
        problems.append((_line_of(lines, loc), msg, None))
    return problems


def _got(value: Any) -> str:
    return f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""


def _raise(source: str, problems: list[Problem]) -> typing.NoReturn:
    problems = sorted(problems, key=lambda p: (p[0] is None, p[0] or 0))
    if len(problems) == 1:
        line, text, hint = problems[0]
        message = f"{source}:{line}: {text}" if line else f"{source}: {text}"
    else:
        parts = [f"line {line}: {text}" if line else text for line, text, _ in problems]
        message = f"{source}: {len(problems)} problems: " + "; ".join(parts)
        hints = [f"line {line}: {h}" if line else h for line, _, h in problems if h]
        hint = "; ".join(hints) if hints else None
    raise RecipeError(message, hint=hint or "see `edgesmith recipe init` for a commented template")


# --------------------------------------------------------------------------- loading


def _resolve_ref(ref: str, base: Path) -> str:
    """``file.py:callable`` relative to the recipe folder becomes absolute; ``pkg.mod:callable`` stays."""
    module, sep, attr = ref.partition(":")
    if module.endswith(".py") or "/" in module:
        p = Path(module).expanduser()
        return f"{(base / p).resolve() if not p.is_absolute() else p}{sep}{attr}"
    return ref


def _resolve_path(p: str | None, base: Path) -> str | None:
    if p is None:
        return None
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q).resolve())


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
    from edgesmith.devices.profiles import list_profiles
    from edgesmith.export import EXPORTERS

    problems: list[Problem] = []
    target = data.get("target")
    profiles = list_profiles()
    if isinstance(target, dict):
        from edgesmith.devices.profiles import resolve_target
        from edgesmith.errors import EdgesmithError

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
    out["stages"] = [{s.name: s.config.model_dump(mode="json")} for s in recipe.stages]
    return out
