"""Property-based fuzzing of what a device reads from a bundle: the manifest parser, tar
extraction (generated tar files with hostile members) and the ONNX file scanner. Each must
accept its input or raise the project's own error (BundleError, ModelLoadError: exit 1 or 2),
never another exception (exit 70); tar extraction never writes outside its destination and
leaves nothing behind when it refuses."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from _fuzz import fuzz
from _tiny import manifest, tiny_onnx
from hypothesis import given
from hypothesis import strategies as st

from edgesmith.errors import BundleError, EdgesmithError, ModelLoadError
from edgesmith.runtime.bundle import (
    MANIFEST,
    SIGNATURE,
    TarLimits,
    canonical_bytes,
    extract_bundle,
    parse_manifest,
    verify_bundle,
)
from edgesmith.runtime.onnxfile import scan_onnx
from edgesmith.text import printable

# --------------------------------------------------------------------------- manifest

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
_paths = st.one_of(
    st.sampled_from(
        ["model.onnx", "golden.npz", "../x", "/etc/passwd", "a/../b", "./m", "x", "x/y", "a\\b",
         "C:x", "", ".", "a//b", "manifest.json", "manifest.sig", "a\x00b", "\x1b[2J", "é/ü",
         "n" * 300, "/".join(["d"] * 600)]
    ),
    st.text(max_size=12),
)  # fmt: skip


def _entry(data: bytes = b"m") -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


_hostile = st.one_of(
    st.sampled_from(
        ["\x1b[2J\x1b]0;x\x07", "a\x00b", "\u202eevil", "\ud7ff", "x" * 5000, "", "-1"]
    ),
    st.text(max_size=8),
)


@st.composite
def _manifests(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema": "edgesmith.bundle/1", "created": "2026-01-01T00:00:00Z"}
    doc.update(manifest())
    doc["files"] = {"model.onnx": _entry()}
    doc["golden"] = {"file": "model.onnx", "atol": 0.1}
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from([*doc, "trainable_head", "extra", "expires", "metrics"]))
        choice = draw(st.integers(0, 6))
        if choice == 0:
            doc.pop(key, None)
        elif choice == 1 and key in ("files",):
            doc["files"] = draw(st.dictionaries(_paths, st.just(_entry()) | _json, max_size=4))
            if isinstance(doc.get("model"), str):
                doc["files"].setdefault(doc["model"], _entry())
        elif choice == 2 and key in ("model", "golden"):
            path = draw(_paths)
            golden = doc.get("golden") if isinstance(doc.get("golden"), dict) else {}
            doc[key] = path if key == "model" else {**golden, "file": path}
            if isinstance(doc.get("files"), dict):
                doc["files"][path] = _entry()
        elif choice == 3 and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], draw(_hostile): draw(_json | _hostile)}
        elif choice == 4 and isinstance(doc.get(key), list) and doc[key]:
            item = draw(
                st.dictionaries(st.sampled_from(["name", "shape", "dtype", "x"]), _json | _hostile)
                | _json
            )
            doc[key] = [item, *doc[key][1:]]
        elif choice == 5:
            doc[key] = draw(_hostile)
        else:
            doc[key] = draw(_json)
    return doc


def _describe_is_printable(raw: bytes) -> None:
    """What `bundle inspect` prints of an accepted manifest has no control characters."""
    import click.testing

    from edgesmith.devices.cli import _describe
    from edgesmith.runtime.bundle import BundleCheck

    m = parse_manifest(raw, "m")
    runner = click.testing.CliRunner()

    @click.command()
    def show() -> None:
        _describe(BundleCheck(m, Path("b"), None, ["\x1b[31mkey"]), as_json=False)

    result = runner.invoke(show)
    assert result.exit_code == 0, result.output
    assert all(c.isprintable() or c == "\n" for c in result.output), repr(result.output)


@fuzz(2.0)
@given(doc=_manifests(), mangle=st.sampled_from(["none", "bytes", "cut"]), data=st.data())
def test_manifest_parser_accepts_or_raises_bundle_error(
    doc: dict[str, Any], mangle: str, data: Any
) -> None:
    try:
        raw = canonical_bytes(doc)
    except (ValueError, TypeError):
        raw = json.dumps(doc, default=str).encode()
    if mangle == "bytes":
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:pos] + data.draw(st.binary(min_size=1, max_size=3)) + raw[pos + 1 :]
    elif mangle == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        parse_manifest(raw, "m")
    except BundleError as exc:
        assert exc.message and all(c.isprintable() for c in exc.message), repr(exc.message)
        return
    _describe_is_printable(raw)


# --------------------------------------------------------------------------- tar extraction

_KINDS = [
    tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
    tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, b"V", b"x", b"7",
]  # fmt: skip


@st.composite
def _members(draw: st.DrawFn) -> list[tuple[tarfile.TarInfo, bytes, bytes]]:
    """(member, archived bytes, bytes it extracts to) for hostile members."""
    out = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(
            st.sampled_from(["model.onnx", "x", "x/y", "x/y/z", "a", "a/b"])
            | _paths.filter(lambda p: "\x00" not in p)
        )
        kind = draw(st.sampled_from(_KINDS))
        data = (
            draw(st.binary(max_size=64))
            if kind in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
            else b""
        )
        info = tarfile.TarInfo(name)
        info.type, info.size = kind, len(data)
        info.linkname = draw(st.sampled_from(["", "model.onnx", "/etc/passwd", "../x"]))
        info.mode = draw(st.sampled_from([0o644, 0o4755, 0o777]))
        expanded = data
        if draw(st.integers(0, 6)) == 0:  # a GNU sparse 1.0 member that expands 1000x
            smap = f"1\n{64000}\n0\n".encode()
            data = smap + b"\0" * (-len(smap) % 512)
            info.type, info.size = tarfile.REGTYPE, len(data)
            info.pax_headers = {
                "GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                "GNU.sparse.name": name, "GNU.sparse.realsize": "64000",
            }  # fmt: skip
            expanded = b"\0" * 64000
        out.append((info, data, expanded))
    return out


class _Tar:
    """Generated tar bytes, shown in a failure report by their members (not 10 kB of bytes)."""

    def __init__(self, data: bytes, names: list[str]) -> None:
        self.data, self.names = data, names

    def __repr__(self) -> str:
        return f"_Tar({len(self.data)} bytes, members {self.names!r})"


@st.composite
def _tars(draw: st.DrawFn) -> _Tar:
    members = draw(_members())
    listed = {
        info.pax_headers.get("GNU.sparse.name", info.name): _entry(expanded)
        for info, _, expanded in members
        if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
        and draw(st.integers(0, 4)) > 0
    }
    doc = {"schema": "edgesmith.bundle/1", "created": "2026-01-01T00:00:00Z", **manifest()}
    model = draw(st.sampled_from([*listed, "model.onnx"]))
    doc.update(model=model, files={**listed, model: listed.get(model, _entry())})
    head = [(_info(MANIFEST, raw := canonical_bytes(doc)), raw)]
    if draw(st.booleans()):
        head.append((_info(SIGNATURE, b'{"signatures": []}'), b'{"signatures": []}'))
    order = draw(st.permutations(head + [(info, data) for info, data, _ in members]))
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    buf = io.BytesIO()
    try:
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for info, data in order:
                tf.addfile(info, io.BytesIO(data) if info.size else None)
    except (ValueError, UnicodeError):  # the writer cannot express it in this format
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for info, data in head:
                tf.addfile(info, io.BytesIO(data))
    raw_tar = buf.getvalue()
    cut = draw(st.sampled_from([None, None, None, "cut", "flip"]))
    if cut == "cut":
        raw_tar = raw_tar[: draw(st.integers(0, len(raw_tar)))]
    elif cut == "flip" and raw_tar:
        pos = draw(st.integers(0, len(raw_tar) - 1))
        raw_tar = raw_tar[:pos] + bytes([draw(st.integers(0, 255))]) + raw_tar[pos + 1 :]
    return _Tar(raw_tar, [f"{i.name}:{i.type!r}" for i, _ in order])


def _info(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@fuzz(3.0)
@given(tar=_tars())
def test_tar_extraction_accepts_or_refuses_and_never_escapes(
    tmp_path_factory: pytest.TempPathFactory, tar: _Tar
) -> None:
    raw = tar.data
    root = tmp_path_factory.mktemp("tar")
    area = root / "area"
    area.mkdir()
    (area / "b.tar").write_bytes(raw)
    dest = area / "out"
    try:
        m = extract_bundle(area / "b.tar", dest, limits=TarLimits(max_total_bytes=1 << 20))
    except BundleError as exc:
        assert exc.message and printable(exc.message) == exc.message, repr(exc.message)
        assert _tree(area) == {"b.tar"}, _tree(area)  # nothing extracted, nothing left behind
    else:
        inside = {"area/out"} | {f"area/out/{p}" for p in _tree(dest)}
        assert _tree(root) - {"area", "area/b.tar"} <= inside
        files = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
        written = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
        assert written <= len(raw), "extraction never expands (sparse members)"
        assert files <= set(m.files) | {MANIFEST, SIGNATURE}
        assert all(not p.is_symlink() for p in dest.rglob("*"))
    assert not list(root.parent.glob("etc")) and not (root / "x").exists()
    with contextlib.suppress(BundleError):
        verify_bundle(area / "b.tar")


def test_tar_fuzz_cli_never_exits_70(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A few generated tars through `bundle verify` and `bundle unpack` (exit 0, 1 or 2)."""
    from edgesmith.cli import main

    codes = []

    @fuzz(0.3)
    @given(tar=_tars())
    def one(tar: _Tar) -> None:
        path = tmp_path / f"t{len(codes)}.tar"
        path.write_bytes(tar.data)
        for args in (
            ["bundle", "verify", path],
            ["bundle", "unpack", path, "-o", tmp_path / f"o{len(codes)}"],
        ):
            with pytest.raises(SystemExit) as exc:
                main([str(a) for a in args])
            codes.append(int(exc.value.code or 0))
            err = capsys.readouterr().err
            assert codes[-1] in (0, 1, 2) and "Traceback" not in err, err

    one()
    assert codes


# --------------------------------------------------------------------------- ONNX scanner


_LOCATIONS = [
    None,
    "w.bin",
    "../w.bin",
    "/etc/passwd",
    "w\x00.bin",
    "\x1b[2J",
    "",
    "a/" * 200 + "w",
]


@pytest.fixture(scope="module")
def onnx_bytes(tmp_path_factory: pytest.TempPathFactory) -> dict[str | None, bytes]:
    """The tiny model, plain and with its weights in external data at each location."""
    root = tmp_path_factory.mktemp("onnx")
    return {
        loc: tiny_onnx(root / f"m{i}.onnx", loc, raw_location=True).read_bytes()
        for i, loc in enumerate(_LOCATIONS)
    }


@fuzz(3.0)
@given(
    location=st.sampled_from(_LOCATIONS),
    edits=st.lists(
        st.tuples(
            st.integers(0, 10**5),
            st.integers(0, 255),
            st.sampled_from(["set", "ins", "del", "cut"]),
        ),
        max_size=8,
    ),
)
def test_onnx_scanner_accepts_or_raises_model_load_error(
    tmp_path_factory: pytest.TempPathFactory,
    onnx_bytes: dict[str | None, bytes],
    location: str | None,
    edits: list[tuple[int, int, str]],
) -> None:
    data = bytearray(onnx_bytes[location])
    for pos, byte, op in edits:
        pos %= len(data) + 1
        if op == "set" and pos < len(data):
            data[pos] = byte
        elif op == "ins":
            data.insert(pos, byte)
        elif op == "del" and pos < len(data):
            del data[pos]
        elif op == "cut":
            del data[pos:]
    root = tmp_path_factory.mktemp("scan")
    path = root / "m.onnx"
    path.write_bytes(bytes(data))
    (root / "w.bin").write_bytes(b"\0" * 768)
    try:
        scan = scan_onnx(path)
    except ModelLoadError as exc:
        assert exc.message and exc.hint and printable(exc.message) == exc.message, exc.message
        return
    for loc in scan.external:  # what passed the screen stays inside the folder
        assert os.path.realpath(root / loc).startswith(os.path.realpath(root))


@fuzz(1.0)
@given(blob=st.binary(max_size=512))
def test_onnx_scanner_on_random_bytes(
    tmp_path_factory: pytest.TempPathFactory, blob: bytes
) -> None:
    path = tmp_path_factory.mktemp("rand") / "r.onnx"
    path.write_bytes(blob)
    try:
        scan_onnx(path)
    except EdgesmithError as exc:
        assert isinstance(exc, ModelLoadError)
