"""Loading a ``torch.export`` ``.pt2`` archive without running anything from it.

``torch.export.load`` trusts its archive: it unpickles some members with ``weights_only=False``
(sample inputs, pickled weights and constants, "opaque" objects), hands shape expressions to
``sympy.sympify`` (which ``eval``\\ s them), ``exec``\\ s the program's guard code and generates Python
from the names it finds. So before torch sees an archive, :func:`load_exported_program`:

1. reads the file once, and accepts only an allow-list of members (format markers, the program's
   JSON, its payload configs, raw or restricted-unpicklable tensors, sample inputs that pass the
   restricted unpickler, ``extra/`` text); everything else (AOTInductor code, pickled objects,
   legacy members, compressed or duplicated entries) is refused with the member's name;
2. screens every string in the JSON: names may use only ``[A-Za-z0-9_.+-]``, shape expressions
   only a small sympy grammar, free text (stack traces, string arguments) no control characters;
3. hands torch a fresh archive built from exactly the screened bytes (no second read, no zip
   parser differences), inside a context that forces ``weights_only=True`` on every
   ``torch.load``, refuses plain ``pickle`` and checks every ``sympify`` string again;
4. builds the module without the program's guard code (``check_guards=False``; the range
   constraints are still checked on every call).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import threading
import tokenize
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgesmith.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

__all__ = ["load_exported_program", "screen_pt2"]

_RESAVE = "re-save it with torch.export.save(ep, 'model.pt2') from a trusted torch program"
UNSAFE_HINT = (
    "edgesmith never unpickles arbitrary objects; save only the weights: "
    "`safetensors.torch.save_file(model.state_dict(), 'w.safetensors')` or `torch.save(model.state_dict(), 'w.pt')`"
)

_NAME = re.compile(r"[A-Za-z0-9_.+\-]*")
_MODEL = re.compile(r"models/([A-Za-z0-9_]+)\.json")
_SAMPLE = re.compile(r"data/sample_inputs/([A-Za-z0-9_]+)\.pt")
_CONFIG = re.compile(r"data/(weights|constants)/([A-Za-z0-9_]+)_(weights|constants)_config\.json")
_PAYLOAD = re.compile(r"data/(weights/weight|constants/tensor)_[0-9]+")
_EXTRA = re.compile(r"extra/[A-Za-z0-9_.\-/]+")
# members holding one short marker, and the values torch.export.save writes there
_MARKERS: dict[str, re.Pattern[bytes]] = {
    "archive_format": re.compile(rb"pt2"),
    "archive_version": re.compile(rb"[0-9]{1,4}"),
    "byteorder": re.compile(rb"little|big"),
    ".data/version": re.compile(rb"[0-9]{1,4}\n?"),
    ".data/serialization_id": re.compile(rb"[0-9A-Za-z_\-]{0,128}"),
}
# JSON fields whose strings are free text: kept as data, printed with repr(), or never executed
_TEXT_FIELDS = {"metadata", "as_string", "as_strings", "guards_code"}
_SPEC_FIELDS = {"in_spec", "out_spec"}  # pytree specs: a JSON document in a string
_MAX_JSON_BYTES = 512 << 20
_MAX_EXPR = 4096

# every name a shape expression may use: sympy's constructors, torch's sympy functions, flags
# fmt: off
_SYMPY_NAMES = frozenset((
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
    "floor", "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality",
    "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not",
    "Piecewise", "ExprCondPair", "true", "false", "BooleanTrue", "BooleanFalse", "oo", "zoo", "nan",
    "Infinity", "NegativeInfinity", "IntInfinity", "NegativeIntInfinity", "int_oo", "Half", "One",
    "Zero", "NegativeOne",
    # torch.utils._sympy.functions, as torch's deserializer names them
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity",
    # assumptions passed as keywords: Symbol('s0', positive=True, integer=True)
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "infinite",
    "commutative", "nonzero", "zero", "even", "odd", "rational", "prime", "composite",
    "precision", "True", "False", "None",
))
_SYMPY_OPS = frozenset(
    ("+", "-", "*", "/", "//", "%", "**", "(", ")", ",", "=", "<", ">", "<=", ">=", "==", "!=",
     "&", "|", "~")
)
# fmt: on
_SYMBOL = re.compile(r"[a-z]+[0-9]+")
# quoted strings: symbol names, Symbol('s0'), or numbers, Float('0.5', precision=53)
_SYMBOL_STRING = re.compile(r"'[A-Za-z_][A-Za-z0-9_]*'|'[0-9.eE+\-]{1,64}'")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")


def safe_sympy_expr(expr: str) -> bool:
    """True if ``expr`` is a shape expression made only of allowed names, numbers and operators.

    Such a string cannot call anything but sympy's arithmetic constructors, so
    ``sympy.sympify`` (an ``eval``) may read it.
    """
    if len(expr) > _MAX_EXPR or _CONTROL.search(expr) or "\n" in expr:
        return False
    try:
        for tok in tokenize.generate_tokens(io.StringIO(expr).readline):
            if tok.type == tokenize.NAME:
                if tok.string not in _SYMPY_NAMES and not _SYMBOL.fullmatch(tok.string):
                    return False
            elif tok.type == tokenize.STRING:
                if not _SYMBOL_STRING.fullmatch(tok.string):
                    return False
            elif tok.type == tokenize.OP:
                if tok.string not in _SYMPY_OPS:
                    return False
            elif tok.type not in (tokenize.NUMBER, tokenize.NEWLINE, tokenize.ENDMARKER):
                return False
    except (tokenize.TokenError, SyntaxError):
        return False
    return True


# --------------------------------------------------------------------------- the archive


def _refuse(source: str, what: str, hint: str = _RESAVE) -> ModelLoadError:
    return ModelLoadError(f"refused to load {source}: {what}", hint=hint)


def _read_members(data: bytes, source: str) -> tuple[str, dict[str, bytes]]:
    """The archive's root folder and its members by inner name, after structural checks."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ModelLoadError(
            f"{source} is not a torch.export archive: {exc}",
            hint="save it with torch.export.save(ep, 'model.pt2')",
        ) from None
    members: dict[str, bytes] = {}
    root = None
    with zf:
        infos = zf.infolist()
        if not infos or len(infos) > 100_000:
            raise _refuse(source, f"it has {len(infos)} entries")
        for info in infos:
            name = info.filename
            head, _, inner = name.partition("/")
            root = head if root is None else root
            if (
                head != root
                or not head
                or not inner
                or name.endswith("/")
                or "\\" in name
                or any(part in ("", ".", "..") for part in inner.split("/"))
            ):
                raise _refuse(source, f"unexpected entry name {name!r}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise _refuse(source, f"'{inner}' is compressed (torch.export.save stores members)")
            if inner in members:
                raise _refuse(source, f"'{inner}' appears twice")
            try:
                members[inner] = zf.read(info)
            except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:
                raise ModelLoadError(
                    f"cannot read {source}: '{inner}': {exc}",
                    hint="is the file complete? re-download or re-save it",
                ) from None
    return root or "", members


def _restricted_load(data: bytes, where: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    import pickle

    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _refuse(where, "it contains Python objects other than tensors", UNSAFE_HINT) from None
    except Exception as exc:  # a truncated or corrupt payload
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot read {where}: {msg}", hint=_RESAVE) from None


def _json(data: bytes, where: str) -> Any:
    if len(data) > _MAX_JSON_BYTES:
        raise _refuse(where, f"{len(data)} bytes of JSON")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise ModelLoadError(f"{where}: malformed JSON", hint=_RESAVE) from None


def _screen_json(doc: Any, where: str) -> None:
    """Every string of a program's JSON is a name, a safe shape expression or inert text."""
    stack: list[tuple[Any, str, str]] = [(doc, "", "name")]
    while stack:
        obj, field, kind = stack.pop()
        if isinstance(obj, dict):
            for key, value in obj.items():
                if kind == "name" and not _NAME.fullmatch(key):
                    raise _refuse(where, f"key {key[:80]!r} is not a plain name")
                sub = kind
                if kind == "name":
                    if key in _TEXT_FIELDS:
                        sub = "text"
                    elif key in _SPEC_FIELDS:
                        sub = "spec"
                    elif key == "expr_str":
                        sub = "expr"
                stack.append((value, key, sub))
        elif isinstance(obj, list):
            stack.extend((v, field, kind) for v in obj)
        elif isinstance(obj, str):
            if kind == "name" and not _NAME.fullmatch(obj):
                raise _refuse(where, f"'{field}' holds {obj[:80]!r}, not a plain name")
            if kind == "text" and _CONTROL.search(obj):
                raise _refuse(where, f"'{field}' holds control characters")
            if kind == "expr" and not safe_sympy_expr(obj):
                raise _refuse(where, f"'{field}' holds {obj[:80]!r}, not a shape expression")
            if kind == "spec":
                stack.append((_decode_spec(obj, where), field, "name"))


def _decode_spec(text: str, where: str) -> Any:
    """A pytree spec with its ``context`` strings (JSON too) decoded, so all of it can be screened."""
    spec = _json(text.encode(), where)
    stack = [spec]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            ctx = obj.get("context")
            if isinstance(ctx, str):
                obj["context"] = _json(ctx.encode(), where)
            stack.extend(obj.values())
        elif isinstance(obj, list):
            stack.extend(obj)
    return spec


def _screen_config(
    cfg: Any, folder: str, members: dict[str, bytes], referenced: set[str], where: str
) -> None:
    import torch

    if not isinstance(cfg, dict) or not isinstance(cfg.get("config", {}), dict):
        raise ModelLoadError(f"{where}: malformed payload config", hint=_RESAVE)
    prefix = "weight_" if folder == "weights" else "tensor_"
    for fqn, meta in (cfg.get("config") or {}).items():
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise ModelLoadError(f"{where}: malformed entry for '{fqn}'", hint=_RESAVE)
        path_name = meta["path_name"]
        member = f"data/{folder}/{path_name}"
        if not re.fullmatch(prefix + "[0-9]+", path_name):
            what = (
                "a pickled Python object"
                if path_name.startswith(("custom_obj_", "opaque_obj_"))
                else "not a tensor payload"
            )
            raise _refuse(where, f"'{fqn}' is stored as '{path_name}', {what}", UNSAFE_HINT)
        if member not in members:
            raise ModelLoadError(f"{where}: payload '{member}' is missing", hint=_RESAVE)
        referenced.add(member)
        if meta.get("use_pickle"):
            value = _restricted_load(members[member], f"{where}:{member}")
            if not isinstance(value, torch.Tensor):
                raise _refuse(where, f"'{member}' holds a {type(value).__name__}, not a tensor")


def screen_pt2(data: bytes, source: str) -> tuple[str, dict[str, bytes]]:
    """Check every member of a ``.pt2`` archive against the allow-list (module docstring).

    Returns:
        The archive's root folder and its members, exactly as screened.

    Raises:
        ModelLoadError: naming the first member that is not allowed, and why.
    """
    root, members = _read_members(data, source)
    referenced: set[str] = set()
    models = []
    for inner, blob in members.items():
        where = f"{source}:{inner}"
        if inner in _MARKERS:
            if not _MARKERS[inner].fullmatch(blob):
                raise _refuse(source, f"unexpected content in '{inner}'")
        elif m := _MODEL.fullmatch(inner):
            _screen_json(_json(blob, where), where)
            models.append(m.group(1))
        elif _SAMPLE.fullmatch(inner):
            inputs = _restricted_load(blob, where) if blob else ()
            if not isinstance(inputs, tuple | dict):
                raise _refuse(where, f"sample inputs are a {type(inputs).__name__}, not a tuple")
        elif m := _CONFIG.fullmatch(inner):
            if m.group(1) != m.group(3):
                raise _refuse(source, f"unexpected member '{inner}'")
            cfg = _json(blob, where)
            _screen_json(cfg, where)
            _screen_config(cfg, m.group(1), members, referenced, where)
        elif _PAYLOAD.fullmatch(inner):
            pass  # checked against the configs below
        elif _EXTRA.fullmatch(inner):
            try:
                blob.decode("utf-8")
            except UnicodeDecodeError:
                raise _refuse(source, f"'{inner}' is not text") from None
        elif inner.startswith("data/aotinductor/"):
            raise _refuse(
                source,
                "it contains compiled AOTInductor code",
                "export with torch.export.save, not aoti_compile_and_package",
            )
        elif inner.endswith(".pt") or "custom_obj_" in inner or "opaque_obj_" in inner:
            raise _refuse(source, f"'{inner}' is a pickled Python object", UNSAFE_HINT)
        else:
            raise _refuse(source, f"unexpected member '{inner}'")
    if members.get("archive_format") != b"pt2":
        raise ModelLoadError(
            f"{source} is not a torch.export archive (no archive_format 'pt2')",
            hint="save it with torch.export.save(ep, 'model.pt2')",
        )
    if "model" not in models:
        raise ModelLoadError(f"{source} holds no program 'models/model.json'", hint=_RESAVE)
    for name in models:
        for needed in (
            f"data/weights/{name}_weights_config.json",
            f"data/constants/{name}_constants_config.json",
        ):
            if needed not in members:
                raise ModelLoadError(f"{source}: '{needed}' is missing", hint=_RESAVE)
    unused = sorted(m for m in members if _PAYLOAD.fullmatch(m) and m not in referenced)
    if unused:
        raise _refuse(source, f"'{unused[0]}' is not referenced by any payload config")
    return root, members


def _repack(root: str, members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for inner, blob in members.items():
            zf.writestr(f"{root}/{inner}", blob)
    return buf.getvalue()


# --------------------------------------------------------------------------- loading

_LOCK = threading.Lock()
_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_NO_FORCE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def _no_unpickling(*args: Any, **kwargs: Any) -> Any:
    raise ModelLoadError("refused to unpickle a member of a .pt2 archive", hint=UNSAFE_HINT)


class _NoPickle:
    """Stands in for the ``pickle`` module inside torch's archive reader."""

    def __getattr__(self, name: str) -> Any:
        return _no_unpickling


class _CheckedSympy:
    """The ``sympy`` module as torch's deserializer sees it: ``sympify`` refuses unsafe strings."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sympify(self, a: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(a, str) and not safe_sympy_expr(a):
            raise ModelLoadError(f"refused a shape expression {a[:80]!r}", hint=_RESAVE)
        return self._real.sympify(a, *args, **kwargs)


@contextlib.contextmanager
def no_code_execution() -> Iterator[None]:
    """Defence in depth around ``torch.export.load``: whatever the screen missed cannot unpickle.

    Forces ``weights_only=True`` on every ``torch.load`` (torch's own switch), and replaces the
    ``pickle`` module, the TorchScript object unpickler and ``sympy`` in torch's archive reader
    and deserializer for the duration. Serialised by a lock (the switches are process-wide).
    """
    import torch

    patches: list[tuple[Any, str, Any]] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_LOCK)
        saved_env = {k: os.environ.get(k) for k in (_FORCE, _NO_FORCE)}
        try:
            import torch._export.serde.serialize as serde
            import torch.export.pt2_archive._package as package
        except ImportError:  # a torch that moved them: the screen and the env switch remain
            serde = package = None
        if package is not None and hasattr(package, "pickle"):
            patches.append((package, "pickle", _NoPickle()))
        if serde is not None and hasattr(serde, "sympy"):
            patches.append((serde, "sympy", _CheckedSympy(serde.sympy)))
        if hasattr(torch._C, "_pickle_load_obj"):
            patches.append((torch._C, "_pickle_load_obj", _no_unpickling))
        originals = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
        try:
            os.environ[_FORCE] = "1"
            os.environ.pop(_NO_FORCE, None)
            for obj, attr, new in patches:
                setattr(obj, attr, new)
            yield
        finally:
            for obj, attr, old in originals:
                setattr(obj, attr, old)
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def load_exported_program(path: str | Path) -> torch.nn.Module:
    """Load a ``torch.export`` ``.pt2`` archive as a callable module, nothing in it executed.

    Raises:
        ModelLoadError: the file is missing, malformed, or holds anything beyond the program,
            its tensors and text (see the module docstring).

    Example:
        >>> module = load_exported_program("model.pt2")  # doctest: +SKIP
        >>> module(torch.randn(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    import torch

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelLoadError(
            f"model file not found: {path}",
            hint="paths in a recipe are relative to the recipe's folder",
        ) from None
    except IsADirectoryError:
        raise ModelLoadError(
            f"{path} is a folder, not a .pt2 file", hint="name the .pt2 file itself"
        ) from None
    root, members = screen_pt2(data, str(path))
    clean = _repack(root, members)
    try:
        with no_code_execution():
            ep = torch.export.load(io.BytesIO(clean))
            ep._guards_code = []  # never compiled into the module (check_guards=False below)
            return ep.module(check_guards=False)
    except ModelLoadError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(
            f"cannot load ExportedProgram {path}: {type(exc).__name__}: {msg}",
            hint="was it saved by a compatible torch version?",
        ) from None
