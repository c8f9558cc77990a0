"""A .pt2 archive is data: nothing in it may run during loading or calling (issue 12, row 1).

Each attack is real: the payload would create a marker file if torch executed it (checked on main
as of issue 12: the sample-inputs pickle, the shape expression, the guard code and the parameter
name all ran). The tests assert the marker never appears.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from edgesmith.errors import ModelLoadError
from edgesmith.models import load_exported_program


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.tensor([2.0]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale + torch.tensor([1.0, 2.0, 3.0])


class _Payload:
    """Unpickling this runs ``eval``: it creates ``marker`` and evaluates to ``result``."""

    def __init__(self, marker: Path, result: str = "None") -> None:
        self.marker, self.result = marker, result

    def __reduce__(self):
        return (eval, (f"(open({str(self.marker)!r}, 'w').close(), {self.result})[1]",))


@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ExportedProgram with a dynamic batch (shape expressions), weights and constants."""
    path = tmp_path_factory.mktemp("pt2") / "net.pt2"
    torch.manual_seed(0)
    net = _Net().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(net, (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, path)
    torch.save(net.state_dict(), path.with_suffix(".sd"))
    return path


def _reference(good: Path) -> _Net:
    net = _Net().eval()
    net.load_state_dict(torch.load(good.with_suffix(".sd"), weights_only=True))
    return net


def _rewrite(
    src: Path,
    dst: Path,
    edit: Callable[[str, bytes], bytes | None] = lambda inner, data: data,
    add: dict[str, bytes] | None = None,
) -> Path:
    """Copy an archive member by member; ``edit`` may change or (returning None) drop each."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for item in zin.infolist():
            data = edit(item.filename.split("/", 1)[1], zin.read(item))
            if data is not None:
                zout.writestr(item, data)
        for inner, data in (add or {}).items():
            zout.writestr(f"{root}/{inner}", data)
    return dst


def _pickled(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _edit_program(fn: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:
    def edit(inner: str, data: bytes) -> bytes:
        if inner == "models/model.json":
            doc = json.loads(data)
            fn(doc)
            return json.dumps(doc).encode()
        return data

    return edit


def test_a_normal_pt2_loads_and_computes_the_same(good_pt2: Path) -> None:
    module = load_exported_program(good_pt2)
    x = torch.randn(5, 4)  # another batch size: the dynamic dimension survived
    with torch.no_grad():
        assert torch.allclose(module(x), _reference(good_pt2)(x), atol=1e-6)
    with pytest.raises(Exception, match="64"):  # range constraints are still enforced
        module(torch.randn(65, 4))


@pytest.mark.parametrize("returns_valid_inputs", [False, True], ids=["plain", "valid-inputs"])
def test_pickled_sample_inputs_are_refused_and_never_run(
    good_pt2: Path, tmp_path: Path, returns_valid_inputs: bool
) -> None:
    marker = tmp_path / "payload-ran"
    result = "((__import__('torch').randn(2, 4),), {})" if returns_valid_inputs else "None"
    evil_inputs = _pickled(_Payload(marker, result))
    evil = _rewrite(
        good_pt2,
        tmp_path / "evil.pt2",
        lambda inner, data: evil_inputs if inner.startswith("data/sample_inputs/") else data,
    )
    with pytest.raises(ModelLoadError) as e:
        load_exported_program(evil)
    assert "data/sample_inputs/model.pt" in e.value.message
    assert "Python objects other than tensors" in e.value.message
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is real: a plain unpickle runs it
    assert marker.exists()


def test_code_in_a_shape_expression_is_refused(good_pt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"

    def inject(doc: dict) -> None:
        text = json.dumps(doc)
        sym = next(s for s in _strings(doc, "expr_str") if s.startswith("Symbol("))
        code = f"(open({str(marker)!r}, 'w').close(), {sym})[1]"
        doc.clear()
        doc.update(json.loads(text.replace(json.dumps(sym), json.dumps(code))))

    evil = _rewrite(good_pt2, tmp_path / "evil.pt2", _edit_program(inject))
    with pytest.raises(ModelLoadError, match="not a shape expression"):
        load_exported_program(evil)
    assert not marker.exists()


def test_guard_code_from_the_archive_never_runs(good_pt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"

    def inject(doc: dict) -> None:
        doc["guards_code"] = [f"(open({str(marker)!r}, 'w').close(), True)[1]"]

    evil = _rewrite(good_pt2, tmp_path / "evil.pt2", _edit_program(inject))
    module = load_exported_program(evil)  # guards are text: the program itself is fine
    module(torch.randn(3, 4))
    assert not marker.exists()


def test_code_in_a_parameter_name_is_refused(good_pt2: Path, tmp_path: Path) -> None:
    """torch.fx writes names into the Python it generates: a quote in a name is code."""
    marker = tmp_path / "payload-ran"
    name = f'lin.weight"),open({str(marker)!r},"w"),getattr(self,"lin'

    def rename(inner: str, data: bytes) -> bytes:
        return data.replace(b'"lin.bias"', json.dumps(name).encode())

    evil = _rewrite(good_pt2, tmp_path / "evil.pt2", rename)
    with pytest.raises(ModelLoadError, match="not a plain name"):
        load_exported_program(evil)(torch.randn(2, 4))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("member", "message"),
    [
        ("data/constants/opaque_obj_0", "pickled Python object"),
        ("data/weights/model.pt", "pickled Python object"),
        ("data/aotinductor/model/model.so", "AOTInductor"),
        ("data/executorch/model.pte", "unexpected member"),
        ("data/weights/weight_99", "not referenced"),
        ("notes.txt", "unexpected member"),
    ],
)
def test_members_outside_the_allow_list_are_refused(
    good_pt2: Path, tmp_path: Path, member: str, message: str
) -> None:
    marker = tmp_path / "payload-ran"
    evil = _rewrite(good_pt2, tmp_path / "evil.pt2", add={member: _pickled(_Payload(marker))})
    with pytest.raises(ModelLoadError, match=message) as e:
        load_exported_program(evil)
    assert e.value.message.startswith("refused to load")
    assert not marker.exists()


def test_a_payload_config_pointing_at_a_pickled_object_is_refused(
    good_pt2: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "payload-ran"

    def edit(inner: str, data: bytes) -> bytes:
        if inner == "data/constants/model_constants_config.json":
            cfg = json.loads(data)
            entry = next(iter(cfg["config"].values()))
            entry["path_name"] = "opaque_obj_0"
            return json.dumps(cfg).encode()
        return data

    evil = _rewrite(
        good_pt2,
        tmp_path / "evil.pt2",
        edit,
        add={"data/constants/opaque_obj_0": pickle.dumps(_Payload(marker))},
    )
    with pytest.raises(ModelLoadError, match="pickled Python object"):
        load_exported_program(evil)
    assert not marker.exists()


def test_duplicate_and_compressed_members_are_refused(good_pt2: Path, tmp_path: Path) -> None:
    """Two parsers (Python's zipfile, torch's miniz) must never see different members."""
    evil = _rewrite(good_pt2, tmp_path / "dup.pt2")
    with zipfile.ZipFile(evil, "a") as z, pytest.warns(UserWarning, match="Duplicate"):
        z.writestr(f"{z.namelist()[0].split('/')[0]}/archive_format", b"pt2")
    with pytest.raises(ModelLoadError, match="appears twice"):
        load_exported_program(evil)
    packed = tmp_path / "deflated.pt2"
    with zipfile.ZipFile(good_pt2) as zin, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as z:
        for item in zin.infolist():
            z.writestr(item.filename, zin.read(item))
    with pytest.raises(ModelLoadError, match="compressed"):
        load_exported_program(packed)


def test_torch_reads_the_bytes_that_were_screened(
    good_pt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Swapping the file after the screen (a race) changes nothing: torch never reopens it."""
    import edgesmith.pt2 as pt2

    marker = tmp_path / "payload-ran"
    target = tmp_path / "model.pt2"
    target.write_bytes(good_pt2.read_bytes())
    evil_inputs = _pickled(_Payload(marker, "((__import__('torch').randn(2, 4),), {})"))
    evil = _rewrite(
        good_pt2,
        tmp_path / "evil.pt2",
        lambda inner, data: evil_inputs if inner.startswith("data/sample_inputs/") else data,
    )
    screen = pt2.screen_pt2

    def screen_then_swap(data: bytes, source: str):  # type: ignore[no-untyped-def]
        result = screen(data, source)
        os.replace(evil, target)
        return result

    monkeypatch.setattr(pt2, "screen_pt2", screen_then_swap)
    module = load_exported_program(target)
    assert target.read_bytes() != good_pt2.read_bytes()
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.allclose(module(x), _reference(good_pt2)(x), atol=1e-6)
    assert not marker.exists()


def test_nothing_inside_the_load_can_unpickle(tmp_path: Path) -> None:
    """Defence in depth: even a torch.load(weights_only=False) in torch's own code is restricted."""
    import torch.export.pt2_archive._package as package

    from edgesmith.pt2 import no_code_execution

    marker = tmp_path / "payload-ran"
    blob = _pickled(_Payload(marker))
    with no_code_execution():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(io.BytesIO(blob), weights_only=False)
        with pytest.raises(ModelLoadError):
            package.pickle.loads(pickle.dumps(_Payload(marker)))
        with pytest.raises(ModelLoadError, match="shape expression"):
            import torch._export.serde.serialize as serde

            serde.sympy.sympify("__import__('os')")
    assert not marker.exists()
    assert package.pickle is pickle and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_shape_expression_grammar() -> None:
    from edgesmith.pt2 import safe_sympy_expr

    good = [
        "Symbol('s77', positive=True, integer=True)",
        "Mul(Integer(3), Max(Integer(1), FloorDiv(Symbol('s0', positive=True, integer=True), "
        "Integer(2))))",
        "s0*s1 + 2 <= 4096",
        "Eq(Mod(s0, 5), 0)",
    ]
    bad = [
        "__import__('os').system('id')",
        "Symbol('s0').__class__",
        "lambda: 0",
        "exec(bytes((112, 114)))",
        "Symbol('s0; import os')",
        "S('1+1')",
        "s0\nimport os",
        "(" * 5000 + "s0" + ")" * 5000,
    ]
    assert all(safe_sympy_expr(e) for e in good)
    assert not any(safe_sympy_expr(e) for e in bad)


def _strings(doc: object, field: str) -> list[str]:
    out: list[str] = []
    stack = [doc]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            out += [v for k, v in obj.items() if k == field and isinstance(v, str)]
            stack.extend(obj.values())
        elif isinstance(obj, list):
            stack.extend(obj)
    return out


@pytest.mark.parametrize("command", ["export", "build"])
def test_edgesmith_export_and_build_refuse_the_archive_with_exit_2(
    good_pt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    from edgesmith.cli import main

    marker = tmp_path / "payload-ran"
    evil_inputs = _pickled(_Payload(marker, "((__import__('torch').randn(2, 4),), {})"))
    _rewrite(
        good_pt2,
        tmp_path / "evil.pt2",
        lambda inner, data: evil_inputs if inner.startswith("data/sample_inputs/") else data,
    )
    (tmp_path / "recipe.yaml").write_text(
        "name: evil\nmodel: {weights: evil.pt2, input: {shape: [1, 4]}}\n"
        "data: {kind: fashion-mnist}\nexport: [onnx]\n"
    )
    out = tmp_path / ("model.onnx" if command == "export" else "out")
    with pytest.raises(SystemExit) as e:
        main([command, str(tmp_path / "recipe.yaml"), "-o", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "\nerror: refused to load" in err and "sample_inputs" in err and "Traceback" not in err
    assert not marker.exists() and not out.exists()
