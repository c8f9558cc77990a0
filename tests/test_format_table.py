"""One format table (edgesmith.runtime.formats): the schemas, the backends and the exporters agree."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from edgesmith.export import EXPORTERS
from edgesmith.runtime.backends import BACKENDS, FORMAT_BACKENDS
from edgesmith.runtime.bundle import Manifest
from edgesmith.runtime.formats import FORMATS, FormatName, format_of_file
from edgesmith.runtime.profiles import Profile


def test_every_reader_of_the_format_table_agrees() -> None:
    assert set(get_args(FormatName)) == set(FORMATS)
    assert Manifest.model_fields["format"].annotation == FormatName
    assert "formats" in Profile.model_fields
    for name, fmt in FORMATS.items():
        assert fmt.name == name and set(fmt.backends) <= set(BACKENDS)
        assert FORMAT_BACKENDS[fmt.suffix] == list(fmt.backends)
        exporter = EXPORTERS[name]
        assert (exporter.suffix, exporter.backend, exporter.side_suffixes) == (
            fmt.suffix,
            fmt.backends[0],
            fmt.side_suffixes,
        )
    assert set(EXPORTERS) == set(FORMATS) and len(FORMAT_BACKENDS) == len(FORMATS)


def test_format_of_a_file_by_its_suffix() -> None:
    found = format_of_file("model.XML")
    assert found is not None and found.name == "openvino"
    assert [p.name for p in found.files(Path("m.xml"))] == ["m.xml", "m.bin"]
    assert format_of_file("weights.safetensors") is None
