"""Tensor specs, input checking and image preprocessing, shared by every backend (numpy only)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np

from edgesmith.errors import InputError

__all__ = [
    "MAX_IMAGE_SIDE",
    "NanPolicy",
    "TensorSpec",
    "check_input",
    "check_shared_dims",
    "fit_input",
    "preprocess_images",
    "preprocessed_shape",
    "validate_preprocess",
]

NanPolicy = Literal["error", "allow"]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (ints, or strings for symbolic dimensions) and numpy dtype name of a tensor."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(name=str(d["name"]), shape=tuple(d["shape"]), dtype=str(d["dtype"]))

    @cached_property
    def np_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.dtype)

    @cached_property
    def batched(self) -> bool:
        """True when dimension 0 is symbolic, so that samples can be stacked along it."""
        return bool(self.shape) and not isinstance(self.shape[0], int)

    @cached_property
    def _tail(self) -> tuple[int, ...] | None:
        # shape[1:] when dimension 0 alone is symbolic: one tuple comparison then checks a shape
        if self.batched and all(isinstance(d, int) for d in self.shape[1:]):
            return tuple(int(d) for d in self.shape[1:])
        return None

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        tail = self._tail
        if tail is not None:
            return len(shape) == len(self.shape) and shape[1:] == tail
        return len(shape) == len(self.shape) and all(
            not isinstance(want, int) or want == got
            for want, got in zip(self.shape, shape, strict=True)
        )


def _shape_str(shape: tuple[int | str, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_input(x: Any, spec: TensorSpec, nan_policy: NanPolicy = "error") -> np.ndarray:
    """Return ``x`` as a numpy array if it matches ``spec``; otherwise raise one clear InputError."""
    if type(x) is not np.ndarray and not isinstance(x, np.ndarray):
        if hasattr(x, "__array__") or isinstance(x, list | tuple):
            x = np.asarray(x)
        else:
            raise InputError(
                f"input '{spec.name}' must be a numpy array, got {type(x).__name__}",
                hint="pass np.asarray(...)",
            )
    dtype = x.dtype
    if dtype is not spec.np_dtype and dtype != spec.np_dtype:
        raise InputError(
            f"input '{spec.name}' has dtype {x.dtype}, expected {spec.dtype}",
            hint=f"convert with x.astype(np.{spec.dtype})",
        )
    if not spec.accepts_shape(x.shape):
        raise InputError(
            f"input '{spec.name}' has shape {list(x.shape)}, expected {_shape_str(spec.shape)}",
            hint="the first dimension is the batch; add it with x[None] for a single sample",
        )
    if nan_policy == "error" and dtype.kind == "f" and not _all_finite(x):
        raise InputError(
            f"input '{spec.name}' contains NaN or Inf",
            hint="clean the input, or load the model with nan_policy='allow'",
        )
    return x


def fit_input(x: Any, spec: TensorSpec, rule: Mapping[str, Any] | None) -> Any:
    """Fit ``x`` to a model input as the bundle manifest's input entry (``rule``) allows.

    ``cast_from``: integer dtypes converted to the input's dtype when every value fits (int64
    token ids for a TFLite model that takes int32). ``dims``: ``{index: {name, example, max}}``
    of dimensions the recipe declared symbolic; where the model file fixes one (TFLite is
    exported at ``max``), shorter inputs are padded with ``pad`` and longer ones cut to it.
    Anything else is left to :func:`check_input`.

    Raises:
        InputError: an integer value that does not fit the input's dtype.
    """
    if not rule or not isinstance(x, np.ndarray):
        return x
    casts = rule.get("cast_from") or ()
    if x.dtype != spec.np_dtype and str(x.dtype) in casts and spec.np_dtype.kind in "iu":
        info = np.iinfo(spec.np_dtype)
        if x.size and (int(x.min()) < info.min or int(x.max()) > info.max):
            raise InputError(
                f"input '{spec.name}' holds values outside {spec.dtype} "
                f"({int(x.min())}..{int(x.max())})",
                hint=f"the model takes {spec.dtype}; give values in {info.min}..{info.max}",
            )
        x = x.astype(spec.np_dtype)
    for key in rule.get("dims") or {}:
        i = int(key)
        if i >= x.ndim or i >= len(spec.shape) or not isinstance(spec.shape[i], int):
            continue
        want, have = int(spec.shape[i]), x.shape[i]
        if have > want:
            x = x[(slice(None),) * i + (slice(0, want),)]
        elif have < want:
            widths = [(0, 0)] * x.ndim
            widths[i] = (0, want - have)
            x = np.pad(x, widths, constant_values=np.asarray(rule.get("pad", 0)).astype(x.dtype))
    return x


def check_shared_dims(
    arrays: Sequence[np.ndarray], specs: Sequence[TensorSpec], rules: Mapping[str, Any]
) -> None:
    """Inputs that share a dimension agree on its size: the batch, and every symbolic dimension
    the manifest names (``dims``: ``input_ids`` and ``attention_mask`` share ``sequence``).

    Raises:
        InputError: naming both inputs, the dimension and the sizes.
    """
    if len(arrays) < 2:
        return
    seen: dict[str, tuple[str, int]] = {}
    for a, spec in zip(arrays, specs, strict=True):
        named: dict[int, str] = {}
        if spec.batched and a.ndim:
            named[0] = "batch"
        for key, dim in ((rules.get(spec.name) or {}).get("dims") or {}).items():
            if isinstance(dim, Mapping) and dim.get("name"):
                named[int(key)] = str(dim["name"])
        for i, name in named.items():
            if i >= a.ndim:
                continue
            size = int(a.shape[i])
            first = seen.setdefault(name, (spec.name, size))
            if first[1] != size:
                raise InputError(
                    f"inputs '{first[0]}' and '{spec.name}' share the dimension '{name}' but have "
                    f"sizes {first[1]} and {size}",
                    hint="give every input the same number of samples"
                    if name == "batch"
                    else f"give every input the same '{name}' size (pad the shorter ones)",
                )


# _all_finite's dot product may overflow (huge finite values: rechecked) or meet Inf (rejected);
# numpy's warnings about it would only be noise, and errstate() costs more than the scan itself.
warnings.filterwarnings(
    "ignore", r"(overflow|invalid value) encountered in dot", RuntimeWarning, __name__
)


def _all_finite(x: np.ndarray) -> bool:
    # x.x is NaN or Inf when any element is; one BLAS call is the cheapest full scan there is
    if x.dtype.char in "fd" and x.size:
        flat = x.reshape(-1)
        if math.isfinite(np.dot(flat, flat)):
            return True
    return bool(np.isfinite(x).all())


MAX_IMAGE_SIDE = 1 << 14
_LAYOUTS = ("NCHW", "NHWC")
_CHANNELS = ("RGB", "BGR", "GRAY")


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def validate_preprocess(pre: dict[str, Any]) -> None:
    """Check a manifest's ``preprocess`` mapping (the keys ``build`` writes; others are ignored).

    Raises:
        ValueError: with the first problem (the manifest parser turns it into a BundleError).
    """
    resize = pre.get("resize")
    if resize is not None and not (
        isinstance(resize, list)
        and len(resize) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) for d in resize)
        and all(1 <= d <= MAX_IMAGE_SIDE for d in resize)
    ):
        raise ValueError(f"'resize' must be [height, width] of 1 to {MAX_IMAGE_SIDE} pixels")
    if "scale" in pre and not _number(pre["scale"]):
        raise ValueError("'scale' must be a finite number")
    sizes = (1,) if pre.get("channels") == "GRAY" else (1, 3)
    for key in ("mean", "std"):
        v = pre.get(key, [1.0])
        if not (isinstance(v, list) and len(v) in sizes and all(_number(x) for x in v)):
            raise ValueError(
                f"'{key}' must be a list of {' or '.join(map(str, sizes))} finite number(s), "
                "one per channel"
            )
    if any(x == 0 for x in pre.get("std", [1.0])):
        raise ValueError("'std' values must be non-zero")
    if pre.get("layout", "NCHW") not in _LAYOUTS:
        raise ValueError(f"'layout' must be one of {', '.join(_LAYOUTS)}")
    if pre.get("channels", "RGB") not in _CHANNELS:
        raise ValueError(f"'channels' must be one of {', '.join(_CHANNELS)}")


def preprocessed_shape(
    shape: tuple[int, ...] | list[int], pre: dict[str, Any]
) -> tuple[int, int, int, int] | None:
    """(N, C, H, W) that :func:`preprocess_images` makes of uint8 images of ``shape``, or None
    when it would refuse that shape. Computed from the shape alone, before any pixel is read."""
    gray = pre.get("channels", "RGB") == "GRAY"
    dims = list(shape)
    if len(dims) == 2 or (len(dims) == 3 and gray and dims[-1] not in (1, 3)):
        dims.append(1)
    if len(dims) == 3:
        dims.insert(0, 1)
    if len(dims) != 4 or dims[-1] not in (1, 3):
        return None
    n, h, w, _ = dims
    resize = pre.get("resize")
    if resize is not None:
        h, w = int(resize[0]), int(resize[1])
    return n, 1 if gray else 3, h, w


def preprocess_images(images: np.ndarray, pre: dict[str, Any], spec: TensorSpec) -> np.ndarray:
    """Turn uint8 images (HWC, NHWC, HW or NHW) into the model's float input as the manifest says.

    ``pre`` holds ``resize`` ([h, w] or None), ``scale``, ``mean``, ``std``, ``layout`` (NCHW or
    NHWC) and ``channels`` (RGB, BGR or GRAY) as written by ``build``; images are given in RGB
    (or gray) order.
    """
    if images.dtype != np.uint8:
        raise InputError(
            f"images must be uint8, got {images.dtype}",
            hint="pass raw 0-255 pixels, or a preprocessed float tensor",
        )
    gray = pre.get("channels", "RGB") == "GRAY"
    x = images
    if x.ndim == 2 or (x.ndim == 3 and gray and x.shape[-1] not in (1, 3)):
        x = x[..., None]  # HW -> HWC, NHW -> NHWC
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise InputError(
            f"images have shape {list(images.shape)}; expected HWC or NHWC",
            hint="one image is (height, width, channels)",
        )
    c = x.shape[-1]
    if gray and c == 3:
        x = (
            (x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
            .round()
            .clip(0, 255)
            .astype(np.uint8)
        )
    elif not gray and c == 1:
        x = np.repeat(x, 3, axis=-1)
    elif c not in (1, 3):
        raise InputError(
            f"images have {c} channels; expected 1 or 3",
            hint="drop the alpha channel: img[..., :3]",
        )
    resize = pre.get("resize")
    if resize is not None and tuple(x.shape[1:3]) != tuple(resize):
        x = _resize(x, int(resize[0]), int(resize[1]))
    if pre.get("channels") == "BGR":
        x = x[..., ::-1]
    # one float copy, normalised in place (a full batch of big images is large)
    mean = np.asarray(pre.get("mean", [0.0]), np.float32).reshape(-1)
    std = np.asarray(pre.get("std", [1.0]), np.float32).reshape(-1)
    if mean.size not in (1, x.shape[-1]) or std.size not in (1, x.shape[-1]):
        raise InputError(
            f"the manifest's mean/std have {mean.size}/{std.size} values for "
            f"{x.shape[-1]}-channel images",
            hint="rebuild the bundle with one mean and std value per channel",
        )
    out = x.astype(np.float32)
    out *= np.float32(pre.get("scale", 1.0 / 255.0))
    out -= mean
    out /= std
    if pre.get("layout", "NCHW") == "NCHW":
        out = out.transpose(0, 3, 1, 2)
    out = np.ascontiguousarray(out, dtype=np.dtype(spec.dtype))
    if not spec.accepts_shape(tuple(out.shape)):
        raise InputError(
            f"preprocessed images have shape {list(out.shape)}, the model expects {_shape_str(spec.shape)}",
            hint="give images of the model's size, or a bundle whose preprocess has 'resize'",
        )
    return out


def _resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the install
        raise InputError(
            f"images of size {x.shape[1]}x{x.shape[2]} need resizing to {h}x{w}, which needs Pillow",
            hint="pip install pillow, or resize before calling the model",
        ) from None
    out = []
    for img in x:
        mode_img = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        r = np.asarray(mode_img.resize((w, h), Image.Resampling.BILINEAR))
        out.append(r[..., None] if r.ndim == 2 else r)
    return np.stack(out)
