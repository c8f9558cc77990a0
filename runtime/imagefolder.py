"""Labelled image folders (Pillow, no torch): the one reader for the build's ``image-folder``
data (:mod:`edgesmith.data`) and on-device fine-tuning.

One rule for what a sample is (:func:`list_image_folder`): ``<split>/<class>/**/<image>`` with a
known image suffix; hidden files and folders are skipped; classes are the sorted folder names.
One decoder (:func:`read_image`): at most ``MAX_PIXELS`` pixels, a readable image, the model's
channel count (gray for ``channels: GRAY``, RGB otherwise). The build converts other modes to
that (``convert=True``: training data from any source); the device refuses them (alpha, palette,
16-bit, CMYK), so that wrong data cannot silently train the head.

On the device, layout: ``DIR/<class>/*.png`` (a held-out split is drawn from it), or
``DIR/train/<class>/...`` plus ``DIR/val/<class>/...`` (or ``test/``, ``holdout/``) for an explicit
held-out split. Images must already have the bundle's image size (``preprocess.resize``, else the
input's size); other sizes are refused unless ``resize=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "ImageSet",
    "expected_image",
    "list_image_folder",
    "read_image",
    "read_image_folder",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
HOLDOUT_DIRS = ("val", "holdout", "test")
MAX_PIXELS = 4096 * 4096


@dataclass
class ImageSet:
    """Images (N, H, W) or (N, H, W, 3) uint8, their class names and files."""

    x: np.ndarray
    y: np.ndarray
    files: list[Path]

    def __len__(self) -> int:
        return len(self.y)


def expected_image(
    preprocess: dict[str, Any] | None, input_shape: tuple[Any, ...]
) -> tuple[int | None, int | None, str]:
    """(height, width, PIL mode) that images for a bundle must have."""
    pre = preprocess or {}
    gray = pre.get("channels") == "GRAY"
    h = w = None
    if pre.get("resize"):
        h, w = (int(v) for v in pre["resize"])
    elif len(input_shape) == 4:
        dims = input_shape[2:4] if pre.get("layout", "NCHW") == "NCHW" else input_shape[1:3]
        if all(isinstance(d, int) for d in dims):
            h, w = int(dims[0]), int(dims[1])
    return h, w, "L" if gray else "RGB"


def list_image_folder(root: Path, hint: str) -> tuple[list[Path], list[str], list[str]]:
    """The images under ``root/<class>/`` (sorted by class, then path), each one's class, and
    the class folders (sorted; one may hold no image).

    Raises:
        DataError: no class folders, or no images in them (``hint`` says how to lay them out).
    """
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders", hint=hint)
    files: list[Path] = []
    names: list[str] = []
    for c in classes:
        for f in sorted((root / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                files.append(f)
                names.append(c)
    if not files:
        raise DataError(
            f"{root} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})", hint=hint
        )
    return files, names, classes


def read_image(
    path: Path,
    mode: str,
    size: tuple[int | None, int | None] = (None, None),
    resize: bool = False,
    convert: bool = False,
) -> np.ndarray:
    """One image as uint8 (H, W) for ``mode`` ``L`` or (H, W, 3) for ``RGB``.

    Args:
        mode: the model's PIL mode (:func:`expected_image`).
        size: (height, width) the image must have (None: any).
        resize: resize an image of another size instead of refusing it.
        convert: convert an image of another mode instead of refusing it.

    Raises:
        DataError: unreadable, too large, or (unless allowed) of another mode or size.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise DataError(
                    f"{path}: {im.width}x{im.height} is too large for an image of this model",
                    hint="resize the images first",
                )
            if im.mode != mode and convert:
                return _sized(im.convert(mode), size, resize, path)
            if im.mode != mode:
                what = {"L": "gray (1 channel)", "RGB": "RGB (3 channels)"}[mode]
                raise DataError(
                    f"{path}: image mode {im.mode} ({len(im.getbands())} channel(s)); the model "
                    f"takes {what} images",
                    hint=f"convert the images (PIL: img.convert('{mode}')), e.g. drop the alpha channel",
                )
            return _sized(im, size, resize, path)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"cannot read image {path}: {exc}", hint="remove or replace the corrupt file"
        ) from None


def _sized(im: Any, size: tuple[int | None, int | None], resize: bool, path: Path) -> np.ndarray:
    from PIL import Image

    h, w = size
    if h is not None and w is not None and (im.height, im.width) != (h, w):
        if not resize:
            raise DataError(
                f"{path}: image is {im.width}x{im.height}; the model takes {w}x{h}",
                hint="give images of the model's size, or pass --resize to resize them",
            )
        return np.asarray(im.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)
    return np.asarray(im, dtype=np.uint8).copy()


def _read_split(
    root: Path, size: tuple[int | None, int | None], mode: str, resize: bool
) -> ImageSet:
    files, names, _ = list_image_folder(root, hint="lay images out as DIR/<class>/<image>.png")
    from edgesmith.progress import track

    images = [read_image(f, mode, size, resize) for f in track(files, f"reading {root.name}")]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(
            f"{root}: images of different sizes {sorted(shapes)[:3]}",
            hint="give images of one size, or pass --resize",
        )
    return ImageSet(np.stack(images), np.asarray(names, dtype=str), files)


def read_image_folder(
    root: str | Path,
    preprocess: dict[str, Any] | None,
    input_shape: tuple[Any, ...],
    resize: bool = False,
) -> tuple[ImageSet, ImageSet | None]:
    """Read a labelled image folder: (training set, explicit held-out set or None).

    Raises:
        DataError: a missing or empty folder, a corrupt image, or an image of the wrong size or
            channel count.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}", hint="give a folder of DIR/<class>/*.png")
    h, w, mode = expected_image(preprocess, input_shape)
    held = next((root / d for d in HOLDOUT_DIRS if (root / d).is_dir()), None)
    if (root / "train").is_dir() and held is not None:
        return _read_split(root / "train", (h, w), mode, resize), _read_split(
            held, (h, w), mode, resize
        )
    return _read_split(root, (h, w), mode, resize), None
