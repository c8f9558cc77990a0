"""Safe YAML loading that remembers the line of every key, for error messages.

The document is parsed once with the safe loader into a node graph, and its size is bounded
before any Python object is built: aliases make a graph, not a tree, so a few hundred bytes of
nested aliases (a "billion laughs") would otherwise expand into billions of values in the
line walk and in validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from edgesmith.errors import RecipeError

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "load_yaml_with_lines", "parse_yaml_with_lines"]

Loc = tuple[str | int, ...]

MAX_BYTES = 1 << 20  # a recipe is a few kB; 1 MiB leaves room for long label lists
MAX_NODES = 20_000  # keys, values and list items, after alias expansion
# libyaml when PyYAML was built with it: several times faster, and it caps nesting itself
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_DEPTH = 64  # nesting of mappings and lists

_ALIAS_HINT = "write the values out, or use fewer and flatter aliases ('&name'/'*name')"


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


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _line(event: yaml.Event) -> int | str:
    return event.start_mark.line + 1 if event.start_mark is not None else "?"


def _check_events(text: str, source: str, max_nodes: int, max_depth: int) -> None:
    """First pass over the parser's events: stop at the first value past the limits, before any
    node is built (a megabyte of tiny values or of brackets stops here, quickly)."""
    loader = _Loader(text)
    try:
        count = depth = 0
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            elif isinstance(event, yaml.NodeEvent):
                count += 1
                if count > max_nodes:
                    raise RecipeError(
                        f"{source}:{_line(event)}: more than {max_nodes} values",
                        hint="is this really a recipe?",
                    )
                if isinstance(event, yaml.CollectionStartEvent):
                    depth += 1
                    if depth > max_depth:
                        raise RecipeError(
                            f"{source}:{_line(event)}: nested more than {max_depth} levels deep",
                            hint="a recipe needs only a few levels of mappings and lists",
                        )
    finally:
        loader.dispose()


def _check_size(root: yaml.Node, source: str, max_nodes: int, max_depth: int) -> None:
    """Refuse a node graph that is cyclic, deeper than ``max_depth`` or larger than ``max_nodes``
    once its aliases are expanded. Linear in the number of distinct nodes."""
    size: dict[int, int] = {}  # id(node) -> expanded size of its subtree
    open_: set[int] = set()  # nodes on the current path (a child among them is a cycle)
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, leaving = stack.pop()
        key = id(node)
        if leaving:
            open_.discard(key)
            total = 1 + sum(size[id(c)] for c in _children(node))
            if total > max_nodes:
                raise RecipeError(
                    f"{source}:{node.start_mark.line + 1}: the document expands to more than "
                    f"{max_nodes} values (nested aliases?)",
                    hint=_ALIAS_HINT,
                )
            size[key] = total
            continue
        if key in size:
            continue
        if key in open_:
            raise RecipeError(
                f"{source}:{node.start_mark.line + 1}: an alias refers to a value that contains it",
                hint=_ALIAS_HINT,
            )
        if depth > max_depth:
            raise RecipeError(
                f"{source}:{node.start_mark.line + 1}: nested more than {max_depth} levels deep",
                hint="a recipe needs only a few levels of mappings and lists",
            )
        open_.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in _children(node) if id(c) not in size)


def parse_yaml_with_lines(
    text: str, source: str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH
) -> tuple[Any, dict[Loc, int]]:
    """Parse YAML text with the safe loader, bounded in size before building any object.

    Returns:
        The parsed document and a map from key path (``("model", "weights")``) to 1-based line.

    Raises:
        RecipeError: not valid YAML, nested too deeply, or too large once aliases are expanded.
    """
    loader = _Loader(text)
    try:
        _check_events(text, source, max_nodes, max_depth)
        node = loader.get_single_node()
        if node is not None:
            _check_size(node, source, max_nodes, max_depth)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise RecipeError(
            f"{source}{where}: malformed YAML: {exc.problem}",
            hint="check indentation and that every 'key: value' pair has a space after the colon",
        ) from None
    except yaml.YAMLError as exc:
        raise RecipeError(
            f"{source}: malformed YAML: {exc}", hint="check the file is YAML"
        ) from None
    except RecursionError:
        raise RecipeError(
            f"{source}: nested too deeply to parse",
            hint="a recipe needs only a few levels of mappings and lists",
        ) from None
    finally:
        loader.dispose()
    lines: dict[Loc, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return data, lines


def load_yaml_with_lines(path: Path, max_bytes: int = MAX_BYTES) -> tuple[Any, dict[Loc, int]]:
    """Read and parse a YAML file with the safe loader (see :func:`parse_yaml_with_lines`).

    Raises:
        RecipeError: the file is missing, a folder, too large, or not valid YAML.
    """
    if path.is_dir():
        raise RecipeError(f"{path} is a folder, not a recipe file", hint="name the .yaml file")
    if not path.is_file():
        raise RecipeError(
            f"recipe file not found: {path}",
            hint="check the path, or create one with `edgesmith recipe init`",
        )
    with path.open("rb") as f:  # read at most the limit: the file may grow after a stat()
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise RecipeError(
            f"{path} is larger than {max_bytes} bytes, the most a recipe may be",
            hint="is this really a recipe?",
        )
    return parse_yaml_with_lines(raw.decode("utf-8", errors="replace"), str(path))
