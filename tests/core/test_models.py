from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from edgesmith.errors import ModelLoadError
from edgesmith.models import build_model, load_exported_program, load_state_dict, load_weights_
from edgesmith.recipe import ModelConfig
from tests.conftest import FMNIST_DIR

FACTORY = f"{FMNIST_DIR / 'model.py'}:SmallCNN"
INPUT = {"shape": [1, 1, 28, 28], "dtype": "float32"}


class _FileCreator:
    """Unpickling this creates a file: the payload of a malicious 'weights' file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _model() -> torch.nn.Module:
    return build_model(
        ModelConfig(factory=FACTORY, weights=str(FMNIST_DIR / "weights.safetensors"), input=INPUT)
    )


def test_factory_plus_safetensors_gives_the_trained_model() -> None:
    from safetensors.torch import load_file

    model = _model()
    assert not model.training
    expected = load_file(FMNIST_DIR / "weights.safetensors")
    assert torch.equal(model.state_dict()["classifier.4.weight"], expected["classifier.4.weight"])


def test_state_dict_via_torch_save_and_checkpoint_wrappers(tmp_path: Path) -> None:
    sd = _model().state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ckpt.pth"
    )
    for name in ("plain.pt", "ckpt.pth"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == sd.keys()
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused_and_its_payload_never_runs(
    tmp_path: Path, zip_format: bool
) -> None:
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "weights.pt"
    payload = {"conv.weight": torch.zeros(1), "x": _FileCreator(marker)}
    if zip_format:
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload))
    # the payload is real: a plain unpickle would create the file
    assert not marker.exists()
    with pytest.raises(ModelLoadError) as e:
        build_model(ModelConfig(factory=FACTORY, weights=str(evil), input=INPUT))
    assert "refused to load" in e.value.message
    assert "safetensors" in (e.value.hint or "")
    assert not marker.exists()


def test_mismatched_weights_are_listed_by_name(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = dict(_model().state_dict())
    sd.pop("classifier.4.bias")
    sd["extra.weight"] = torch.zeros(2)
    sd["classifier.1.weight"] = torch.zeros(3, 3)
    save_file(sd, tmp_path / "w.safetensors")
    with pytest.raises(ModelLoadError) as e:
        build_model(
            ModelConfig(factory=FACTORY, weights=str(tmp_path / "w.safetensors"), input=INPUT)
        )
    msg = e.value.message
    assert "missing keys: classifier.4.bias" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "classifier.1.weight (3, 3) vs model (64, 3136)" in msg


def test_factory_that_raises_or_returns_the_wrong_type(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(
        "def boom():\n    raise RuntimeError('no GPU here')\n\ndef notmodule():\n    return 42\n"
    )
    with pytest.raises(ModelLoadError, match="raised RuntimeError: no GPU here"):
        build_model(ModelConfig(factory=f"{tmp_path / 'bad.py'}:boom", input=INPUT))
    with pytest.raises(ModelLoadError, match="returned int, not a torch.nn.Module"):
        build_model(ModelConfig(factory=f"{tmp_path / 'bad.py'}:notmodule", input=INPUT))
    with pytest.raises(ModelLoadError, match="has no attribute 'Nope'"):
        build_model(ModelConfig(factory=f"{tmp_path / 'bad.py'}:Nope", input=INPUT))
    with pytest.raises(ModelLoadError, match="module 'no_such_pkg.mod' not found"):
        build_model(ModelConfig(factory="no_such_pkg.mod:F", input=INPUT))


def test_truncated_weights_file(tmp_path: Path) -> None:
    data = (FMNIST_DIR / "weights.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_state_dict(tmp_path / "w.safetensors")
    torch.save(_model().state_dict(), tmp_path / "w.pt")
    raw = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_state_dict(tmp_path / "w.pt")


def _exported(tmp_path: Path) -> tuple[Path, torch.nn.Module, torch.Tensor]:
    model = _model()
    x = torch.randn(2, 1, 28, 28)
    ep = torch.export.export(model, (x,))
    path = tmp_path / "model.pt2"
    torch.export.save(ep, path)
    return path, model, x


def test_pt2_exported_program_loads_without_a_factory(tmp_path: Path) -> None:
    path, model, x = _exported(tmp_path)
    loaded = build_model(ModelConfig(weights=str(path), input=INPUT))
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_pt2_with_a_pickled_object_payload_is_refused(tmp_path: Path) -> None:
    path, _, _ = _exported(tmp_path)
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("weights_config.json"):
                import json

                cfg = json.loads(data)
                first = next(iter(cfg["config"]))
                cfg["config"][first]["use_pickle"] = True
                cfg["config"][first]["path_name"] = "weight_evil"
                data = json.dumps(cfg).encode()
                prefix = item.filename.split("data/weights/")[0]
                buf = io.BytesIO()
                torch.save({"t": _FileCreator(marker)}, buf)
                dst.writestr(prefix + "data/weights/weight_evil", buf.getvalue())
            dst.writestr(item, data)
    with pytest.raises(ModelLoadError, match="refused to load"):
        load_exported_program(evil)
    assert not marker.exists()


def test_load_weights_in_place_returns_the_model() -> None:
    model = _model()
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    assert load_weights_(model, sd) is model
    assert float(model.classifier[4].weight.detach().abs().sum()) == 0.0
