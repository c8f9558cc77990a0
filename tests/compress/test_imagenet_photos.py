"""The ImageNet-style example: pretrained EfficientNet-Lite0 as int8 on real photographs found
offline (examples/imagenet_photos). The build itself is slow and needs four Debian packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from edgesmith.errors import DataError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "imagenet_photos"


def _photos() -> Any:
    spec = importlib.util.spec_from_file_location("imagenet_photos", EXAMPLE / "photos.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_missing_packages_are_refused_with_the_apt_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = _photos()
    monkeypatch.setenv("EDGESMITH_PHOTO_ROOT", str(tmp_path))
    with pytest.raises(DataError) as e:
        photos.load_photos(cache=False)
    assert "tuxpaint-stamps-default" in e.value.message and "not installed" in e.value.message
    assert e.value.hint.startswith(
        "sudo apt-get install tuxpaint-stamps-default gcompris-qt-data opencv-doc mate-backgrounds"
    )


def _installed() -> bool:
    try:
        _photos()._check_installed(Path("/usr/share"))
    except DataError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(
    not _installed(),
    reason="needs: sudo apt-get install "
    + " ".join(("tuxpaint-stamps-default", "gcompris-qt-data", "opencv-doc", "mate-backgrounds")),
)
@pytest.mark.parametrize(
    ("recipe", "formats"),
    [
        ("recipe.yaml", ("onnx", "openvino")),  # intel-cpu (VNNI)
        ("recipe-tflite.yaml", ("tflite",)),  # x86-cpu
    ],
)
def test_pretrained_efficientnet_int8_on_real_photos(
    recipe: str, formats: tuple[str, ...], tmp_path: Path
) -> None:
    """Every format agrees with fp32 top-1 on >= 95% of the held-out photos, keeps at most two
    layers float, is >= 3.5x smaller and faster than its fp32 model (interleaved timing)."""
    from edgesmith.pipeline import build
    from edgesmith.recipe import load_recipe

    photos = _photos()
    images, sources, calibration = photos.load_photos()
    assert len(images) >= 500 and 0.45 < calibration.mean() < 0.55
    assert len(set(sources.tolist())) >= 8  # several packages, not one kind of picture

    report = build(load_recipe(EXAMPLE / recipe), tmp_path / "out", bundle_version=1)
    assert report["baseline"]["accuracy"] == 1.0  # the labels are the float model's top-1
    arts = {(a["format"], a["precision"]): a for a in report["artifacts"]}
    for fmt in formats:
        fp32, int8 = arts[(fmt, "fp32")], arts[(fmt, "int8")]
        q = int8["quantization"]
        assert int8["accuracy"] >= 0.95, (fmt, int8["accuracy"])
        assert len(q["float_layers"]) <= 2, (fmt, q["float_layers"])
        assert fp32["size_bytes"] / int8["size_bytes"] >= 3.5
        assert q["speed"]["faster"], (fmt, q["speed"])
        assert q["bias_correction"]["method"] == "bias-correction"
        assert q["accuracy_contract"]["gate"] == "max_accuracy_drop"
    assert report["seconds"] < 1200
