"""Training, calibration and evaluation data for a build.

Built-in loaders read Fashion-MNIST IDX files, image folders (``train/`` and ``val/`` or
``test/``, one sub-folder per class) and ``.npz`` files with ``x_train``, ``y_train``, ``x_test``,
``y_test`` (the Keras layout); ``factory`` names a callable returning ``(train, calib, eval)``
torch datasets. Images pass through the same preprocessing the runtime applies on the device.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgesmith.errors import DataError
from edgesmith.feeds import InputLayout, sample_inputs, torch_collate
from edgesmith.refs import resolve_ref
from edgesmith.runtime.specs import TensorSpec, preprocess_images

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from edgesmith.schema import DataConfig

__all__ = [
    "FASHION_MNIST_LABELS",
    "FASHION_MNIST_PREPROCESS",
    "Datasets",
    "load_datasets",
    "read_fashion_mnist",
    "read_idx",
]

FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_PREPROCESS: dict[str, Any] = {
    "resize": [28, 28],
    "scale": 1.0 / 255.0,
    "mean": [0.2860],
    "std": [0.3530],
    "layout": "NCHW",
    "channels": "GRAY",
}
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FMNIST_HINT = "install it with `sudo apt-get install dataset-fashion-mnist`, or set data.path to a folder with the four *-ubyte.gz files"


@dataclass
class Datasets:
    """The three splits, plus what the bundle needs to know about the inputs."""

    train: Dataset
    calibration: Dataset
    eval: Dataset
    labels: list[str] | None = None
    preprocess: dict[str, Any] | None = None
    # batches several inputs, or inputs whose size varies (padding): for torch DataLoaders
    collate: Any = None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes into an array."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}", hint=_FMNIST_HINT) from None
    except (OSError, EOFError) as exc:
        raise DataError(
            f"cannot read {path}: {exc}",
            hint="the file is truncated or corrupt; reinstall or re-download it",
        ) from None
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes",
            hint="expected the Fashion-MNIST *-ubyte.gz files",
        )
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(
            f"{path} holds {body.size} values but its header says {dims}",
            hint="the file is truncated; reinstall or re-download it",
        )
    return body.reshape(dims)


def read_fashion_mnist(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the ``train`` or ``test`` split."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST folder not found: {root}", hint=_FMNIST_HINT)
    images_name, labels_name = _FMNIST_FILES[split]
    images, labels = read_idx(root / images_name), read_idx(root / labels_name)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{root}: {split} images {images.shape} and labels {labels.shape} do not match",
            hint=_FMNIST_HINT,
        )
    return images, labels.astype(np.int64)


def _tensor_dataset(x: np.ndarray, y: np.ndarray) -> Dataset:
    import torch
    from torch.utils.data import TensorDataset

    return TensorDataset(
        torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    )


def _as_model_input(
    images: np.ndarray, pre: dict[str, Any], shape: list[int], dtype: str
) -> np.ndarray:
    spec = TensorSpec("input", ("batch", *shape[1:]), dtype)
    out = []
    for start in range(0, len(images), 2048):
        out.append(preprocess_images(images[start : start + 2048], pre, spec))
    return np.concatenate(out) if out else np.zeros((0, *shape[1:]), dtype)


class _ImageFolder:
    """Lazy image-folder dataset: decodes and preprocesses one file per item."""

    def __init__(
        self, files: list[tuple[Path, int]], pre: dict[str, Any], shape: list[int], dtype: str
    ) -> None:
        self.files, self.pre, self.spec = (
            files,
            pre,
            TensorSpec("input", ("batch", *shape[1:]), dtype),
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        import torch

        from edgesmith.runtime.imagefolder import read_image

        path, label = self.files[i]
        mode = "L" if self.pre.get("channels") == "GRAY" else "RGB"
        # the build converts modes and takes camera-sized photos (see runtime.imagefolder)
        arr = read_image(path, mode, convert=True, max_pixels=None)
        x = preprocess_images(arr, self.pre, self.spec)[0]
        return torch.from_numpy(x), torch.tensor(label, dtype=torch.int64)


def _list_image_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    from edgesmith.runtime.imagefolder import list_image_folder

    files, names, classes = list_image_folder(
        root, hint="lay images out as <split>/<class>/<image>.png"
    )
    index = {c: i for i, c in enumerate(classes)}
    return [(f, index[n]) for f, n in zip(files, names, strict=True)], classes


def _split_train(
    n: int, calibration: int, train: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    if calibration >= n:
        raise DataError(
            f"calibration asks for {calibration} samples but the training split has only {n}",
            hint=f"set data.calibration below {n}",
        )
    perm = np.random.default_rng(seed).permutation(n)
    calib, rest = perm[:calibration], perm[calibration:]
    return (rest[:train] if train else rest), calib


def load_datasets(
    config: DataConfig,
    input_shape: list[int | str],
    input_dtype: str = "float32",
    seed: int = 0,
    layouts: list[InputLayout] | None = None,
) -> Datasets:
    """Build the three splits a recipe asks for.

    Args:
        config: the recipe's ``data`` section (paths already resolved).
        input_shape: the (first) model input shape, batch first; samples are checked against it.
        input_dtype: the (first) model input dtype.
        seed: seeds the calibration/training split.
        layouts: every model input (``edgesmith.feeds.layouts_of``); default: one input of
            ``input_shape`` and ``input_dtype``.

    Raises:
        DataError: samples that do not fit the model's inputs (named), unreadable data.
    """
    from torch.utils.data import Subset

    layouts = layouts or [InputLayout("input", input_dtype, tuple(input_shape))]
    if config.kind is not None and (len(layouts) > 1 or layouts[0].ragged):
        raise DataError(
            f"data kind '{config.kind}' yields one fixed-size input, but the model takes "
            f"{', '.join(f'{lay.name} {list(lay.shape)}' for lay in layouts)}",
            hint="give data.factory returning (train, calibration, eval) datasets of "
            "((input, ...), target) pairs",
        )
    shape = [int(d) if isinstance(d, int) else 1 for d in input_shape]
    input_shape = shape
    pre = config.preprocess.model_dump() if config.preprocess else None
    if config.kind == "fashion-mnist":
        assert config.path is not None
        pre = pre or dict(FASHION_MNIST_PREPROCESS)
        xtr, ytr = read_fashion_mnist(config.path, "train")
        xte, yte = read_fashion_mnist(config.path, "test")
        tr_idx, cal_idx = _split_train(len(xtr), config.calibration, config.train, seed)
        n_eval = min(config.eval or len(xte), len(xte))
        x_train = _as_model_input(xtr, pre, input_shape, input_dtype)
        x_eval = _as_model_input(xte[:n_eval], pre, input_shape, input_dtype)
        train = _tensor_dataset(x_train, ytr)
        ds = Datasets(
            Subset(train, tr_idx.tolist()),
            Subset(train, cal_idx.tolist()),
            _tensor_dataset(x_eval, yte[:n_eval]),
            config.labels or list(FASHION_MNIST_LABELS),
            pre,
        )
    elif config.kind == "npz":
        ds = _load_npz(config, input_shape, input_dtype, seed, pre)
    elif config.kind == "image-folder":
        ds = _load_image_folder(config, input_shape, input_dtype, seed, pre)
    else:
        ds = _load_factory(config)
    _check_sample(ds, layouts)
    if len(layouts) > 1 or layouts[0].ragged:
        ds.collate = torch_collate(layouts)
    return ds


def _load_npz(
    config: DataConfig, shape: list[int], dtype: str, seed: int, pre: dict[str, Any] | None
) -> Datasets:
    from torch.utils.data import Subset

    path = Path(config.path or "")
    if not path.is_file():
        raise DataError(
            f"npz file not found: {path}",
            hint="paths in a recipe are relative to the recipe's folder",
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, MemoryError) as exc:
        # MemoryError: a header that declares an array larger than this machine's memory
        raise DataError(
            f"cannot read {path}: {exc}",
            hint="save with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...) (no object arrays)",
        ) from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(
            f"{path} lacks arrays {missing} (has {sorted(arrays)})",
            hint="use the keys x_train, y_train, x_test, y_test",
        )
    xs = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise DataError(
                f"{path}: x_{split} has {len(x)} samples but y_{split} has {len(y)}",
                hint="one label per sample",
            )
        if x.dtype == np.uint8 and x.ndim in (3, 4) and tuple(x.shape[1:]) != tuple(shape[1:]):
            if pre is None:
                raise DataError(
                    f"{path}: x_{split} holds uint8 images {x.shape[1:]} but the model takes {shape[1:]}",
                    hint="add data.preprocess (resize, mean, std, channels) to the recipe",
                )
            x = _as_model_input(x, pre, shape, dtype)
        elif x.dtype == np.uint8 and pre is not None:
            x = _as_model_input(x, pre, shape, dtype)
        xs[split] = (x.astype(dtype, copy=False), y.astype(np.int64) if y.dtype.kind in "iu" else y)
    tr_idx, cal_idx = _split_train(len(xs["train"][0]), config.calibration, config.train, seed)
    train = _tensor_dataset(*xs["train"])
    n_eval = min(config.eval or len(xs["test"][0]), len(xs["test"][0]))
    return Datasets(
        Subset(train, tr_idx.tolist()),
        Subset(train, cal_idx.tolist()),
        _tensor_dataset(xs["test"][0][:n_eval], xs["test"][1][:n_eval]),
        config.labels,
        pre,
    )


def _load_image_folder(
    config: DataConfig, shape: list[int], dtype: str, seed: int, pre: dict[str, Any] | None
) -> Datasets:
    from torch.utils.data import Subset

    root = Path(config.path or "")
    if not root.is_dir():
        raise DataError(
            f"image folder not found: {root}",
            hint="paths in a recipe are relative to the recipe's folder",
        )
    eval_dir = next((root / d for d in ("val", "test", "eval") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or eval_dir is None:
        raise DataError(
            f"{root} needs a train/ and a val/ (or test/) sub-folder",
            hint="lay images out as train/<class>/*.png and val/<class>/*.png",
        )
    pre = pre or {
        "resize": list(shape[2:4]) if len(shape) == 4 else None,
        "scale": 1 / 255,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "layout": "NCHW",
        "channels": "RGB",
    }
    train_files, classes = _list_image_folder(root / "train")
    eval_files, eval_classes = _list_image_folder(eval_dir)
    if eval_classes != classes:
        raise DataError(
            f"class folders differ: train has {classes}, {eval_dir.name} has {eval_classes}",
            hint="use the same class names in both",
        )
    train = _ImageFolder(train_files, pre, shape, dtype)
    tr_idx, cal_idx = _split_train(len(train), config.calibration, config.train, seed)
    n_eval = min(config.eval or len(eval_files), len(eval_files))
    eval_ds = _ImageFolder(
        eval_files[:n_eval]
        if n_eval == len(eval_files)
        else [
            eval_files[i] for i in np.random.default_rng(seed).permutation(len(eval_files))[:n_eval]
        ],
        pre,
        shape,
        dtype,
    )
    return Datasets(
        Subset(train, tr_idx.tolist()),
        Subset(train, cal_idx.tolist()),
        eval_ds,  # type: ignore[arg-type]
        config.labels or classes,
        pre,
    )


def _load_factory(config: DataConfig) -> Datasets:
    assert config.factory is not None
    fn = resolve_ref(config.factory, what="data factory", error=DataError)
    try:
        out = fn()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"data factory '{config.factory}' raised {type(exc).__name__}: {exc}",
            hint="run with --debug for the traceback",
        ) from exc
    if isinstance(out, dict):
        out = tuple(out.get(k) for k in ("train", "calibration", "eval"))
    if not (
        isinstance(out, tuple | list)
        and len(out) == 3
        and all(hasattr(d, "__getitem__") and hasattr(d, "__len__") for d in out)
    ):
        raise DataError(
            f"data factory '{config.factory}' must return (train, calibration, eval) datasets, got {type(out).__name__}",
            hint="return three torch Datasets of (input, target) pairs",
        )
    train, calib, ev = out
    for name, d in (("train", train), ("calibration", calib), ("eval", ev)):
        if len(d) == 0:
            raise DataError(
                f"data factory '{config.factory}' returned an empty {name} set",
                hint="every split needs samples",
            )
    labels = config.labels or getattr(ev, "classes", None)
    pre = config.preprocess.model_dump() if config.preprocess else None
    return Datasets(train, calib, ev, list(labels) if labels else None, pre)


def _check_sample(ds: Datasets, layouts: list[InputLayout]) -> None:
    """The first calibration and evaluation samples fit the declared inputs (all of them are
    checked when the build reads the evaluation set)."""
    for name in ("calibration", "eval", "train"):
        split = getattr(ds, name)
        if len(split) == 0:
            if name == "train":
                continue
            raise DataError(
                f"the {name} split is empty",
                hint="check data.calibration / data.eval and the data files",
            )
        item = split[0]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise DataError(
                f"{name} samples are {type(item).__name__}s, not (inputs, target) pairs",
                hint="a data set yields (inputs, target); inputs is one array, or a tuple/dict of "
                "arrays (one per model input)",
            )
        sample_inputs(item[0], layouts, f"{name} samples")
