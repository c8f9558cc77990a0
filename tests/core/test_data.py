from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgesmith.data import FASHION_MNIST_LABELS, load_datasets, read_fashion_mnist
from edgesmith.errors import DataError
from edgesmith.recipe import DataConfig

FMNIST = "/usr/share/datasets/fashion-mnist"
SHAPE = [1, 1, 28, 28]


def test_fashion_mnist_is_real_and_complete() -> None:
    x, y = read_fashion_mnist(FMNIST, "train")
    xt, yt = read_fashion_mnist(FMNIST, "test")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert xt.shape == (10000, 28, 28)
    assert np.bincount(y).tolist() == [6000] * 10  # the real data set is balanced
    assert np.bincount(yt).tolist() == [1000] * 10


def test_splits_are_disjoint_sized_and_normalised() -> None:
    ds = load_datasets(
        DataConfig(kind="fashion-mnist", calibration=100, eval=300, train=1000), SHAPE
    )
    assert (len(ds.train), len(ds.calibration), len(ds.eval)) == (1000, 100, 300)
    assert set(ds.train.indices).isdisjoint(ds.calibration.indices)  # type: ignore[attr-defined]
    x, y = ds.eval[0]
    assert (
        x.shape == (1, 28, 28) and x.dtype == torch.float32 and int(y) == 9
    )  # first test image: ankle boot
    xs = torch.stack([ds.train[i][0] for i in range(500)])
    assert (
        abs(float(xs.mean())) < 0.15 and 0.8 < float(xs.std()) < 1.2
    )  # standardised with the data set's mean/std
    assert ds.labels == FASHION_MNIST_LABELS
    again = load_datasets(
        DataConfig(kind="fashion-mnist", calibration=100, eval=300, train=1000), SHAPE
    )
    assert again.calibration.indices == ds.calibration.indices  # type: ignore[attr-defined]


def test_missing_dataset_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_datasets(DataConfig(kind="fashion-mnist", path=str(tmp_path / "nope")), SHAPE)
    assert "apt-get install dataset-fashion-mnist" in (e.value.hint or "")


def test_truncated_idx_file_is_reported(tmp_path: Path) -> None:
    for f in Path(FMNIST).iterdir():
        shutil.copy(f, tmp_path / f.name)
    raw = gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-1000]))
    with pytest.raises(DataError, match="truncated|header says"):
        read_fashion_mnist(tmp_path, "test")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError):
        read_fashion_mnist(tmp_path, "test")


def test_calibration_larger_than_train_split() -> None:
    with pytest.raises(DataError, match="calibration asks for 70000"):
        load_datasets(DataConfig(kind="fashion-mnist", calibration=70000), SHAPE)


def _real_subset(n: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = read_fashion_mnist(FMNIST, "train")
    xt, yt = read_fashion_mnist(FMNIST, "test")
    return x[:n], y[:n], xt[: n // 2], yt[: n // 2]


def test_npz_with_uint8_images_uses_the_preprocessing(tmp_path: Path) -> None:
    x, y, xt, yt = _real_subset()
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    pre = {"scale": 1 / 255, "mean": [0.5], "std": [0.5], "channels": "GRAY"}
    ds = load_datasets(
        DataConfig(kind="npz", path=str(tmp_path / "d.npz"), calibration=20, preprocess=pre), SHAPE
    )
    assert (len(ds.train), len(ds.calibration), len(ds.eval)) == (180, 20, 100)
    got, label = ds.eval[3]
    assert torch.allclose(got[0], torch.from_numpy((xt[3] / 255 - 0.5) / 0.5).float(), atol=1e-6)
    assert int(label) == yt[3]


def test_npz_refuses_pickled_objects_and_missing_keys(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "obj.npz",
        x_train=np.array([{"a": 1}], dtype=object),
        y_train=np.zeros(1),
        x_test=np.zeros(1),
        y_test=np.zeros(1),
    )
    with pytest.raises(DataError, match="cannot read"):
        load_datasets(DataConfig(kind="npz", path=str(tmp_path / "obj.npz"), calibration=1), SHAPE)
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"lacks arrays \['y_train', 'x_test', 'y_test'\]"):
        load_datasets(
            DataConfig(kind="npz", path=str(tmp_path / "partial.npz"), calibration=1), SHAPE
        )


def test_image_folder_reads_real_images_and_class_names(tmp_path: Path) -> None:
    from PIL import Image

    x, y, xt, yt = _real_subset(120)
    for split, xs, ys in (("train", x, y), ("val", xt, yt)):
        for i, (img, label) in enumerate(zip(xs, ys, strict=True)):
            folder = tmp_path / split / FASHION_MNIST_LABELS[label].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i}.png")
    pre = {
        "resize": [28, 28],
        "scale": 1 / 255,
        "mean": [0.286],
        "std": [0.353],
        "channels": "GRAY",
    }
    ds = load_datasets(
        DataConfig(kind="image-folder", path=str(tmp_path), calibration=10, preprocess=pre), SHAPE
    )
    assert len(ds.train) + len(ds.calibration) == 120 and len(ds.eval) == 60
    assert ds.labels == sorted({FASHION_MNIST_LABELS[i].replace("/", "-") for i in y})
    xi, li = ds.eval[0]
    assert xi.shape == (1, 28, 28)
    path, label = ds.eval.files[0]  # type: ignore[attr-defined]
    assert ds.labels[label] == path.parent.name and int(li) == label
    (tmp_path / "val" / path.parent.name / "broken.png").write_bytes(b"not a png")
    ds = load_datasets(
        DataConfig(kind="image-folder", path=str(tmp_path), calibration=10, preprocess=pre), SHAPE
    )
    bad = next(i for i, (p, _) in enumerate(ds.eval.files) if p.name == "broken.png")  # type: ignore[attr-defined]
    with pytest.raises(DataError, match="cannot read image"):
        ds.eval[bad]
    # a camera-sized photo (24 MP) is a normal training image at build time; the device's
    # 16.7 MP bound (runtime.imagefolder.MAX_PIXELS) is for its own fine-tuning data
    big = tmp_path / "val" / path.parent.name / "camera.png"
    Image.new("L", (6000, 4000), 128).save(big, compress_level=1)
    ds = load_datasets(
        DataConfig(kind="image-folder", path=str(tmp_path), calibration=10, preprocess=pre), SHAPE
    )
    photo = next(i for i, (p, _) in enumerate(ds.eval.files) if p.name == "camera.png")  # type: ignore[attr-defined]
    assert ds.eval[photo][0].shape == (1, 28, 28)
    from edgesmith.runtime.imagefolder import read_image

    with pytest.raises(DataError, match="too large"):
        read_image(big, "L")


def test_factory_datasets_and_shape_mismatch(tmp_path: Path) -> None:
    (tmp_path / "make.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def ok():\n    d = TensorDataset(torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))\n    return d, d, d\n"
        "def wrong_shape():\n    d = TensorDataset(torch.zeros(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))\n    return d, d, d\n"
        "def empty():\n    d = TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0))\n    return d, d, d\n"
    )
    ds = load_datasets(DataConfig(factory=f"{tmp_path / 'make.py'}:ok"), SHAPE)
    assert len(ds.eval) == 8
    with pytest.raises(
        DataError,
        match=r"samples have shape \[3, 32, 32\] but the model takes \[1, 28, 28\]",
    ):
        load_datasets(DataConfig(factory=f"{tmp_path / 'make.py'}:wrong_shape"), SHAPE)
    with pytest.raises(DataError, match="empty train set"):
        load_datasets(DataConfig(factory=f"{tmp_path / 'make.py'}:empty"), SHAPE)
