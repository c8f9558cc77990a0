"""One validation layer for every config file and option set: pydantic errors become problems.

A problem is ``(line, what is wrong, how to fix it)``. ``problems_from_error`` turns every error of
a ``ValidationError`` into one (unknown keys get the nearest known key, unions are merged into
"expected A or B", the received value is named), ``raise_problems`` reports them all at once as
``file:line key: problem`` plus the suggestions, and ``validate`` does both for one model.
Used for recipes, device profiles, ``agent.yaml``, the compression commands' options and the
runtime's (serve, fine-tune).

Example:
    >>> validate(Profile, data, source="board.yaml", lines=lines)  # doctest: +SKIP
    EdgesmithError: board.yaml: 2 problems: line 3: 'arch': ...; line 9: unknown key 'thread'
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from pydantic import BaseModel, ValidationError

from edgesmith.errors import EdgesmithError, RecipeError
from edgesmith.yamlutil import Loc

__all__ = [
    "Problem",
    "dotted",
    "flag",
    "line_of",
    "problems_from_error",
    "quoted",
    "raise_problems",
    "validate",
]

M = TypeVar("M", bound=BaseModel)


class Problem(NamedTuple):
    """One thing wrong in a config: its 1-based line (None if unknown), what, and how to fix it."""

    line: int | None
    message: str
    hint: str | None = None


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
    """The keys a user may write at ``loc`` (fields excluded from dumps are internal)."""
    cls: type[BaseModel] | None = root
    for part in loc:
        if cls is None:
            return []
        if isinstance(part, int) or part not in cls.model_fields:
            continue
        cls = _unwrap(cls.model_fields[part].annotation)
    if cls is None:
        return []
    return [name for name, f in cls.model_fields.items() if not f.exclude]


def line_of(lines: dict[Loc, int], loc: Loc) -> int | None:
    """The line of ``loc``, or of its nearest parent that has one."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def dotted(loc: Loc) -> str:
    """``("stages", 0, "prune")`` -> ``stages[0].prune``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def quoted(loc: Loc) -> str:
    """How a key is named in a message about a file: ``'model.weights'``."""
    return f"'{dotted(loc)}'"


def flag(loc: Loc) -> str:
    """How a key is named in a message about command-line options: ``--max-batch``."""
    return "--" + str(loc[0]).replace("_", "-") if loc else "options"


def _is_type_tag(part: str | int) -> bool:
    """pydantic puts the tried member of a union into the error location ('str', 'dict[str,any]')."""
    return isinstance(part, str) and (
        part.startswith("function-")
        or "[" in part
        or part in ("str", "int", "float", "bool", "none")
    )


def _got(value: Any) -> str:
    return f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""


def problems_from_error(
    exc: ValidationError,
    root: type[BaseModel],
    lines: dict[Loc, int] | None = None,
    prefix: Loc = (),
    name: Callable[[Loc], str] = quoted,
) -> list[Problem]:
    """Every error of ``exc`` (raised validating ``root`` at ``prefix``) as a :class:`Problem`.

    Args:
        exc: the pydantic error.
        root: the model that was validated (for the known keys of a misspelt one).
        lines: key path -> line, from :func:`edgesmith.yamlutil.load_yaml_with_lines`.
        prefix: where ``root`` sits in the file (e.g. ``("stages", 0, "prune")``).
        name: how a key path is written in the message (``'a.b'`` for files, ``--a-b`` for options).
    """
    lines = lines or {}
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
            known = _fields_at(root, loc[len(prefix) : -1])
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            msg = f"unknown key {name(loc)}"
            if close:
                hint = f"did you mean '{close[0]}'?"
            elif known:
                hint = f"known keys here: {', '.join(known)}"
        elif err["type"] == "missing":
            msg = f"missing required key {name(loc)}"
        else:
            text = err["msg"].removeprefix("Value error, ")
            got = "" if "got " in text else _got(err.get("input"))  # validators may name it already
            msg = f"{name(loc)}: {text}{got}"
        problems.append(Problem(line_of(lines, loc), msg, hint))
    for loc, msgs in union_msgs.items():
        msg = f"{name(loc)}: expected {' or '.join(dict.fromkeys(msgs))}{_got(union_input[loc])}"
        problems.append(Problem(line_of(lines, loc), msg, None))
    return problems


def raise_problems(
    source: str,
    problems: list[Problem] | list[tuple[int | None, str, str | None]],
    hint: str,
    error: type[EdgesmithError] = RecipeError,
) -> typing.NoReturn:
    """Raise ``error`` listing every problem in line order: ``source:line: problem``.

    One problem reads ``source:line: problem`` with its own suggestion as the hint; several read
    ``source: N problems: line L: ...; line M: ...`` with the suggestions joined. ``hint`` is
    used when no problem has a suggestion. An empty ``source`` leaves the prefix out.
    """
    items = sorted((Problem(*p) for p in problems), key=lambda p: (p.line is None, p.line or 0))
    lead = f"{source}: " if source else ""
    if len(items) == 1:
        line, text, fix = items[0]
        message = f"{source}:{line}: {text}" if line and source else f"{lead}{text}"
    else:
        parts = [f"line {line}: {text}" if line else text for line, text, _ in items]
        message = f"{lead}{len(items)} problems: " + "; ".join(parts)
        fixes = [f"line {line}: {h}" if line else h for line, _, h in items if h]
        fix = "; ".join(fixes) if fixes else None
    raise error(message, hint=fix or hint)


def validate(
    cls: type[M],
    data: Any,
    *,
    source: str,
    hint: str,
    lines: dict[Loc, int] | None = None,
    name: Callable[[Loc], str] = quoted,
    error: type[EdgesmithError] = EdgesmithError,
) -> M:
    """``cls.model_validate(data)``, or ``error`` listing every problem (see :func:`raise_problems`)."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise_problems(source, problems_from_error(exc, cls, lines, name=name), hint, error)
