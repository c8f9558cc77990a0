"""Resolve ``module:callable`` and ``path/to/file.py:callable`` references."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgesmith.errors import EdgesmithError

__all__ = ["absolute_path", "absolute_ref", "resolve_ref"]


def absolute_ref(ref: str, base: Path) -> str:
    """``file.py:callable`` relative to ``base`` becomes absolute; ``pkg.mod:callable`` stays."""
    module, sep, attr = ref.partition(":")
    if module.endswith(".py") or "/" in module:
        p = Path(module).expanduser()
        return f"{(base / p).resolve() if not p.is_absolute() else p}{sep}{attr}"
    return ref


def absolute_path(p: str | None, base: Path) -> str | None:
    """A path relative to ``base`` made absolute (None stays None)."""
    if p is None:
        return None
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q).resolve())


def resolve_ref(
    ref: str, what: str = "factory", error: type[EdgesmithError] = EdgesmithError
) -> Callable[..., Any]:
    """Import the callable named by ``ref``.

    Args:
        ref: ``pkg.module:callable`` or ``path/to/file.py:callable``.
        what: how to name the reference in error messages.
        error: the exception class raised on failure.
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise error(
            f"{what} '{ref}' is not of the form 'module:callable' or 'file.py:callable'",
            hint="e.g. 'examples/fashion_mnist/model.py:SmallCNN'",
        )
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise error(
                f"{what} file not found: {path}",
                hint="paths in a recipe are relative to the recipe's folder",
            )
        mod_key = f"_edgesmith_user_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(mod_key)
        if module is None:
            spec = importlib.util.spec_from_file_location(mod_key, path)
            if spec is None or spec.loader is None:
                raise error(f"cannot import {what} file {path}", hint="is it a Python file?")
            module = importlib.util.module_from_spec(spec)
            sys.path.insert(0, str(path.parent))  # let the file import its siblings
            try:
                sys.modules[mod_key] = module
                spec.loader.exec_module(module)
            except Exception as exc:
                sys.modules.pop(mod_key, None)
                raise error(
                    f"importing {path} failed: {type(exc).__name__}: {exc}",
                    hint="fix the error in that file, or run with --debug for the traceback",
                ) from exc
            finally:
                sys.path.remove(str(path.parent))
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise error(
                f"{what} module '{module_name}' not found ({exc.name} is missing)",
                hint="install it, or give a file path like 'path/to/model.py:Factory'",
            ) from exc
        except Exception as exc:
            raise error(
                f"importing '{module_name}' failed: {type(exc).__name__}: {exc}",
                hint="run with --debug for the traceback",
            ) from exc
    try:
        obj = getattr(module, attr)
    except AttributeError:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise error(
            f"'{module_name}' has no attribute '{attr}'",
            hint=f"available: {', '.join(public[:12])}",
        ) from None
    if not callable(obj):
        raise error(f"{what} '{ref}' is not callable", hint="name a class or function")
    return obj
