"""edgesmith: compress, export, verify, deploy and update PyTorch models on edge devices.

Importing this package is cheap: it pulls in neither torch nor any inference backend.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

__all__ = ["__version__"]


def _extend_path_in_checkout() -> None:
    """Let ``edgesmith.runtime`` & co. resolve to the sibling folders when run from a source checkout.

    The design card fixes the top-level folders (``compress/ export/ runtime/ devices/``); an install
    maps them under ``edgesmith``. Python started in the checkout's root finds this core folder first,
    which would hide the installed sub-packages; adding the checkout root to ``__path__`` makes the
    checkout import exactly like the installed package. An installed copy has no ``pyproject.toml``
    beside it and is left alone.
    """
    root = _Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not (pyproject.is_file() and (root / "runtime" / "__init__.py").is_file()):
        return
    try:
        declares_us = 'name = "edgesmith"' in pyproject.read_text(encoding="utf-8")
    except OSError:
        return
    if declares_us and str(root) not in __path__:
        __path__.append(str(root))


_extend_path_in_checkout()
