"""The class stays closed: no product code may unpickle, eval or unsafely parse data (issue 12).

An AST scan of every Python file outside ``tests/`` (import aliases resolved) refuses:

- ``pickle``/``_pickle``/``dill``/``joblib``/``marshal``/``shelve`` loading, ``torch.jit.load``;
- ``eval``/``exec``/``compile`` builtins, ``sympy.sympify``/``parse_expr`` (they ``eval`` strings);
- ``numpy.load`` without ``allow_pickle=False``;
- ``torch.load`` without ``weights_only=True``;
- ``yaml.load`` without a safe loader, ``yaml.unsafe_load``/``full_load``, the unsafe loader classes;
- ``torch.export.load`` anywhere but ``edgesmith/pt2.py`` (which screens the archive first).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from tests.conftest import ROOT

_FORBIDDEN_CALLS = {
    "pickle.load": "unpickles",
    "pickle.loads": "unpickles",
    "pickle.Unpickler": "unpickles",
    "_pickle.load": "unpickles",
    "_pickle.loads": "unpickles",
    "dill.load": "unpickles",
    "dill.loads": "unpickles",
    "joblib.load": "unpickles",
    "marshal.load": "loads code objects",
    "marshal.loads": "loads code objects",
    "shelve.open": "unpickles",
    "torch.jit.load": "runs TorchScript from a file",
    "torch.package.PackageImporter": "unpickles",
    "eval": "evaluates a string",
    "exec": "executes a string",
    "compile": "compiles a string",
    "sympy.sympify": "evals a string",
    "sympy.parse_expr": "evals a string",
    "sympy.parsing.sympy_parser.parse_expr": "evals a string",
    "yaml.unsafe_load": "builds arbitrary objects",
    "yaml.full_load": "builds arbitrary objects",
    "yaml.load_all": "needs a safe loader",
}
_UNSAFE_YAML_LOADERS = {"yaml.Loader", "yaml.UnsafeLoader", "yaml.FullLoader", "yaml.CLoader",
                        "yaml.CUnsafeLoader", "yaml.CFullLoader"}  # fmt: skip
_SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}
_PT2_LOADER = Path("edgesmith/pt2.py")


def _imports(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted name, from the module's imports (``import numpy as np`` etc.)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = (
                    a.name if a.asname else a.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.expr, names: dict[str, str]) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(names.get(node.id, node.id))
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def scan(source: str, path: Path) -> list[str]:
    """Every forbidden call in ``source``, as ``path:line: what``."""
    tree = ast.parse(source)
    names = _imports(tree)
    found: list[str] = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{path}:{getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute | ast.Name):
            dotted = _dotted(node, names)
            if dotted in _UNSAFE_YAML_LOADERS:
                flag(node, f"{dotted} builds arbitrary objects")
        if not isinstance(node, ast.Call):
            continue
        func = _dotted(node.func, names)
        if func is None:
            continue
        if func in _FORBIDDEN_CALLS:
            flag(node, f"{func}() {_FORBIDDEN_CALLS[func]}")
        elif func == "numpy.load" and not _is_const(_kw(node, "allow_pickle"), False):
            flag(node, "numpy.load() without allow_pickle=False")
        elif func == "torch.load" and not _is_const(_kw(node, "weights_only"), True):
            flag(node, "torch.load() without weights_only=True")
        elif func == "yaml.load":
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader, names) not in _SAFE_YAML_LOADERS:
                flag(node, "yaml.load() without a safe Loader")
        elif func == "torch.export.load" and path != _PT2_LOADER:
            flag(node, "torch.export.load() outside edgesmith/pt2.py (use load_exported_program)")
    return found


def _product_files() -> list[Path]:
    """Every Python file of the checkout but the tests (and hidden or build folders)."""
    skip = {"tests", "build", "dist", "__pycache__", "node_modules"}
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        out += [Path(folder, f).relative_to(ROOT) for f in files if f.endswith(".py")]
    return sorted(out)


def test_no_product_code_unpickles_evals_or_loads_unsafely() -> None:
    files = _product_files()
    assert Path("edgesmith/models.py") in files and Path("runtime/serve/server.py") in files
    found = [f for p in files for f in scan((ROOT / p).read_text(encoding="utf-8"), p)]
    assert found == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\npickle.loads(b)",
        "import pickle as p\np.load(f)",
        "from pickle import loads\nloads(b)",
        "import numpy as np\nnp.load(f)",
        "import numpy as np\nnp.load(f, allow_pickle=True)",
        "from numpy import load\nload(f)",
        "import torch\ntorch.load(f)",
        "import torch\ntorch.load(f, weights_only=False)",
        "import torch\ntorch.export.load(f)",
        "import yaml\nyaml.load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.FullLoader)",
        "import yaml\nyaml.unsafe_load(text)",
        "import yaml\nx = yaml.UnsafeLoader",
        "eval(s)",
        "exec(s)",
        "import sympy\nsympy.sympify(s)",
        "import marshal\nmarshal.loads(b)",
        "import torch\ntorch.jit.load(f)",
    ],
)
def test_the_scan_catches_each_form(snippet: str) -> None:
    assert scan(snippet, Path("x.py")), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import numpy as np\nnp.load(f, allow_pickle=False)",
        "import torch\ntorch.load(f, map_location='cpu', weights_only=True)",
        "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
        "import yaml\nyaml.safe_load(text)",
        "import ast\nast.literal_eval(s)",
        "model.eval()",
    ],
)
def test_the_scan_allows_the_safe_forms(snippet: str) -> None:
    assert scan(snippet, Path("x.py")) == []
