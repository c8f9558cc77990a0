"""The other files edgesmith reads from users: training checkpoints, ``.npz`` data sets and the
pruned-structure metadata of ``.safetensors`` weights. None may run code, and a hostile or corrupt
one is a readable error (exit 2), not a crash (issue 12: the audit of every loading path)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from edgesmith.errors import CompressionError, DataError, ModelLoadError


class _FileCreator:
    """Unpickling this creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_training_checkpoint_with_a_payload_is_refused(tmp_path: Path) -> None:
    from edgesmith.compress.train import load_checkpoint

    marker = tmp_path / "payload-ran"
    ckpt = tmp_path / "last.pt"
    torch.save({"kind": "edgesmith.train", "model": _FileCreator(marker)}, ckpt)
    with pytest.raises(CompressionError, match="cannot read checkpoint"):
        load_checkpoint(ckpt, torch.nn.Linear(2, 2))
    assert not marker.exists()


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    x = np.zeros((20, 1, 4, 4), np.float32)
    y = np.zeros(20, np.int64)
    base = {"x_train": x, "y_train": y, "x_test": x, "y_test": y}
    np.savez(path, **{**base, **arrays})
    return path


def _huge_header(path: Path) -> Path:
    """A valid .npz whose x_train header declares 4 TB of float32."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    )
    ok = _npz(path.with_name("ok.npz"))
    with zipfile.ZipFile(ok) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            data = header.getvalue() + b"\0" * 64 if name == "x_train.npy" else src.read(name)
            dst.writestr(name, data)
    return path


@pytest.mark.parametrize("kind", ["object-array", "truncated", "not-a-zip", "huge-header"])
def test_hostile_npz_data_is_a_data_error(tmp_path: Path, kind: str) -> None:
    from edgesmith.data import load_datasets
    from edgesmith.recipe import DataConfig

    marker = tmp_path / "payload-ran"
    path = tmp_path / "data.npz"
    if kind == "object-array":
        _npz(path, x_train=np.array([_FileCreator(marker)] * 20, dtype=object))
    elif kind == "truncated":
        raw = _npz(path).read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "not-a-zip":
        path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    else:
        _huge_header(path)
    config = DataConfig(kind="npz", path=str(path), calibration=4)
    with pytest.raises(DataError, match="cannot read"):
        load_datasets(config, [1, 1, 4, 4], "float32", seed=0)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("structure", "message"),
    [
        ("[" * 100_000, "malformed"),
        (json.dumps({"version": 1, "modules": {"0": 5}}), "malformed"),
        (json.dumps({"version": 1, "modules": {"0": {"type": "Linear", "x": "s"}}}), "malformed"),
        (
            json.dumps({"version": 1, "modules": {"0": {"type": "Linear", "forward": 3}}}),
            "not one of its shape attributes",
        ),
    ],
    ids=["deep-json", "entry-not-a-mapping", "string-value", "non-shape-attribute"],
)
def test_pruned_structure_metadata_is_validated(
    tmp_path: Path, structure: str, message: str
) -> None:
    from safetensors.torch import save_file

    from edgesmith.compress.pruning.structure import (
        STRUCTURE_KEY,
        apply_structure_,
        read_structure,
    )

    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    path = tmp_path / "w.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={STRUCTURE_KEY: structure})
    with pytest.raises(ModelLoadError, match=message):
        apply_structure_(model, read_structure(path), state)  # type: ignore[arg-type]
    assert isinstance(model[0].forward.__self__, torch.nn.Linear)  # forward untouched
