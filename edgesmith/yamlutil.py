"""Safe YAML loading that remembers the line of every key, for error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from edgesmith.errors import RecipeError

__all__ = ["load_yaml_with_lines"]

Loc = tuple[str | int, ...]


def _walk(node: yaml.Node, path: Loc, lines: dict[Loc, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _walk(value_node, (*path, key), lines)
            lines[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), lines)


def load_yaml_with_lines(path: Path, max_bytes: int = 1 << 20) -> tuple[Any, dict[Loc, int]]:
    """Parse a YAML file with the safe loader.

    Returns:
        The parsed document and a map from key path (``("model", "weights")``) to 1-based line.

    Raises:
        RecipeError: the file is missing, too large, or not valid YAML.
    """
    if not path.is_file():
        raise RecipeError(
            f"recipe file not found: {path}",
            hint="check the path, or create one with `edgesmith recipe init`",
        )
    if path.stat().st_size > max_bytes:
        raise RecipeError(
            f"{path} is {path.stat().st_size} bytes; a recipe may be at most {max_bytes}",
            hint="is this really a recipe?",
        )
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise RecipeError(
            f"{path}{where}: malformed YAML: {exc.problem}",
            hint="check indentation and that every 'key: value' pair has a space after the colon",
        ) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: malformed YAML: {exc}", hint="check the file is YAML") from None
    lines: dict[Loc, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return data, lines
