"""Click options made from the fields of a config model, so that a flag cannot disagree with the key.

``field_option(PruneConfig, "steps", help=...)`` is ``--steps`` with the type, the choices and the
bounds of ``PruneConfig.steps`` (``click.IntRange(1, 100)``); the option defaults to None, so
that the recipe's value (or the model's default) applies unless the flag is given.

Example:
    >>> @click.command()
    ... @field_option(DistillConfig, "alpha", help="Weight of the teacher loss.")
    ... def cmd(alpha: float | None) -> None: ...
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Any, Literal

import annotated_types
import click
from pydantic import BaseModel

__all__ = ["click_type", "field_option"]


def _strip_none(annotation: Any) -> Any:
    """``X | None`` -> ``X``; other annotations unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    """``Field(ge=..., lt=...)`` constraints as click range arguments."""
    out: dict[str, Any] = {}
    for m in metadata:
        if isinstance(m, annotated_types.Ge):
            out.update(min=m.ge, min_open=False)
        elif isinstance(m, annotated_types.Gt):
            out.update(min=m.gt, min_open=True)
        elif isinstance(m, annotated_types.Le):
            out.update(max=m.le, max_open=False)
        elif isinstance(m, annotated_types.Lt):
            out.update(max=m.lt, max_open=True)
    return out


def click_type(model: type[BaseModel], name: str, scale: float = 1) -> tuple[Any, bool]:
    """The click type of a field, and whether the option repeats (a list field).

    ``scale``: the option is given in units of ``scale`` field units (``--max-body-mb`` for a
    field in bytes: ``1 << 20``); its bounds are divided by it and it takes decimals.

    Raises:
        TypeError: a field whose type has no plain command-line form (write that option by hand).
    """
    field = model.model_fields[name]
    annotation = _strip_none(field.annotation)
    multiple = typing.get_origin(annotation) is list
    if multiple:
        (annotation,) = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return click.Choice([str(v) for v in typing.get_args(annotation)]), multiple
    bounds = _bounds(field.metadata)
    if scale != 1 and annotation in (int, float):
        scaled = {k: v / scale if k in ("min", "max") else v for k, v in bounds.items()}
        return click.FloatRange(**scaled), multiple
    if annotation is int:
        return (click.IntRange(**bounds) if bounds else click.INT), multiple
    if annotation is float:
        return (click.FloatRange(**bounds) if bounds else click.FLOAT), multiple
    if annotation is str:
        return click.STRING, multiple
    if annotation is bool:
        return click.BOOL, multiple
    raise TypeError(f"{model.__name__}.{name} ({field.annotation}) has no plain option form")


def field_option(
    model: type[BaseModel],
    name: str,
    *decls: str,
    help: str,
    scale: float = 1,
    show_default: bool = False,
    **attrs: Any,
) -> Callable[[Any], Any]:
    """A ``click.option`` for ``model.name`` (``--name-with-dashes`` unless ``decls`` are given).

    A bool field becomes a flag; a list field a repeatable option. The option's value is None
    (or an empty tuple) when it is not given, so that the model's default (or the recipe's value)
    applies; with ``show_default`` it is the model's default, shown in the help.

    Args:
        scale: the option is given in units of ``scale`` field units (bounds divided by it); its
            value is handed on in field units (rounded for an int field).
        show_default: default to the model's default and show it in the help.
    """
    ctype, multiple = click_type(model, name, scale)
    decls = decls or ("--" + name.replace("_", "-"),)
    field = model.model_fields[name]
    if show_default and field.default is not None and not field.is_required():
        attrs.update(default=field.default / scale if scale != 1 else field.default)
        attrs["show_default"] = True
    if ctype is click.BOOL:
        return click.option(*decls, name, is_flag=True, default=None, help=help, **attrs)
    if scale != 1:
        cast = int if _strip_none(field.annotation) is int else float

        def to_field_units(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
            return None if value is None else cast(value * scale)

        attrs["callback"] = to_field_units
    return click.option(*decls, name, type=ctype, multiple=multiple, help=help, **attrs)
