"""What every format's quantizer shares: the layer record, the protocol, calibration data, names.

A format's quantizer calibrates once when built, lists the layers it can keep in float, and writes
a quantized model for any set of float layers. The accuracy-aware search (``mixed.py``) needs
nothing else, so it works for every format.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgesmith.errors import DataError, EdgesmithError

if TYPE_CHECKING:
    import torch

    from edgesmith.feeds import Samples

__all__ = [
    "Layer",
    "ModuleNames",
    "Quantizer",
    "calibration_array",
    "calibration_samples",
    "check_method",
    "display_name",
    "feeds_for",
]


@dataclass(frozen=True)
class Layer:
    """A quantizable operation of an exported model.

    Attributes:
        id: the format's own name for it (ONNX node name, OpenVINO friendly name, TFLite output tensor).
        name: the PyTorch module it came from when known (``features.3``), else ``id``.
        op: the format's operator type (``Conv``, ``GroupConvolution``, ``FULLY_CONNECTED``...).
        params: weight elements (0 for ops without weights, such as activation-activation MatMul).
    """

    id: str
    name: str
    op: str
    params: int

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.name, "op": self.op, "id": self.id, "params": self.params}


class Quantizer(Protocol):
    """One format's post-training quantizer, calibrated once."""

    format: str
    layers: list[Layer]

    def quantize(self, path: Path, float_layers: Collection[str]) -> list[Path]:
        """Write the model with every layer int8 except ``float_layers`` (ids); return its files."""
        ...


def check_method(method: str, fmt: str, methods: Iterable[str]) -> None:
    """Refuse a calibration method the format's quantizer does not implement.

    Raises:
        EdgesmithError: naming the methods it does implement.
    """
    known = list(methods)
    if method not in known:
        raise EdgesmithError(
            f"calibration_method '{method}' is not available for {fmt}",
            hint=f"use one of: {', '.join(known)}",
        )


def _count(dataset: Any, samples: int | None, min_samples: int) -> int:
    """How many samples ``dataset`` has, checked against ``min_samples`` and ``samples``."""
    n = len(dataset) if dataset is not None else 0
    if n < min_samples:
        raise DataError(
            f"the calibration set has {n} sample{'s' if n != 1 else ''}; int8 calibration needs at least {min_samples}",
            hint="raise data.calibration (512 is a good default), or lower the quantize stage's min_calibration_samples",
        )
    if samples is not None and samples > n:
        raise DataError(
            f"calibration_samples={samples} but the calibration set has only {n}",
            hint=f"raise data.calibration to {samples} or lower calibration_samples",
        )
    return n


def calibration_array(
    dataset: Any, samples: int | None, min_samples: int, input_shape: tuple[int, ...]
) -> np.ndarray:
    """Stack the calibration inputs into one float array, checking their number and shapes.

    Args:
        dataset: a dataset of ``(input, target)`` pairs.
        samples: how many to take (None: all).
        min_samples: fewer than this is an error.
        input_shape: the model's input shape without the batch dimension.

    Raises:
        DataError: too few samples, or a sample of another shape.
    """
    n = _count(dataset, samples, min_samples)
    take = n if samples is None else samples
    arrays = []
    for i in range(take):
        item = dataset[i]
        x = item[0] if isinstance(item, tuple | list) else item
        x = np.asarray(x.numpy() if hasattr(x, "numpy") else x)
        if tuple(x.shape) != tuple(input_shape):
            raise DataError(
                f"calibration sample {i} has shape {list(x.shape)} but the model takes {list(input_shape)} (batch first: {[1, *input_shape]})",
                hint="give calibration samples of the model's input shape (check data.preprocess or the data factory)",
            )
        if not np.isfinite(x).all():
            raise DataError(
                f"calibration sample {i} contains NaN or Inf",
                hint="clean the calibration data; one bad value ruins a tensor's int8 range",
            )
        arrays.append(x.astype(np.float32, copy=False))
    return np.stack(arrays)


def calibration_samples(
    dataset: Any, samples: int | None, min_samples: int, layouts: Sequence[Any]
) -> Samples:
    """The calibration inputs, every input in its own dtype (token ids stay integers), checked.

    Args:
        dataset: a dataset of ``(inputs, target)`` pairs.
        samples: how many to take (None: all).
        min_samples: fewer than this is an error.
        layouts: the model's inputs (``edgesmith.feeds.InputLayout``).

    Raises:
        DataError: too few samples, a sample that does not fit the inputs, NaN/Inf in a float input.
    """
    from edgesmith.feeds import Samples, sample_inputs

    n = _count(dataset, samples, min_samples)
    items = []
    for i in range(n if samples is None else samples):
        item = dataset[i]
        x = item[0] if isinstance(item, tuple | list) and len(item) == 2 else item
        arrays = sample_inputs(x, layouts, f"calibration sample {i}")
        for lay, a in zip(layouts, arrays, strict=True):
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise DataError(
                    f"calibration sample {i} contains NaN or Inf in input '{lay.name}'",
                    hint="clean the calibration data; one bad value ruins a tensor's int8 range",
                )
        items.append(arrays)
    return Samples.from_items(items, layouts)


def feeds_for(
    calibration: Any, specs: Sequence[tuple[str, Sequence[Any], Any]], batch: int = 1
) -> list[dict[str, np.ndarray]]:
    """Calibration batches as ``{input name: array}`` for a model file whose inputs are ``specs``
    (``(name, shape, numpy dtype)``, in the file's order, matched to the samples' inputs by name,
    else by position): each input in the file's dtype (int64 ids become int32 for TFLite), fixed
    dimensions padded or cut to the file's size. Samples whose size varies go one at a time."""
    from edgesmith.feeds import Samples

    samples = Samples.of(calibration)
    names = [n for n, _, _ in specs]
    column = []
    for i, name in enumerate(names):
        j = samples.names.index(name) if name in samples.names else None
        if j is None:
            hits = [k for k, n in enumerate(samples.names) if n in name]
            j = hits[0] if len(hits) == 1 else i
        column.append(j)
    size = 1 if samples.ragged else batch
    out = []
    for _, arrays in samples.batches(size):
        feed = {}
        for (name, shape, dtype), j in zip(specs, column, strict=True):
            a = arrays[j]
            for d, want in enumerate(shape):
                if d == 0 or not isinstance(want, int | np.integer) or want <= 0:
                    continue
                if a.shape[d] > want:
                    a = np.take(a, np.arange(want), axis=d)
                elif a.shape[d] < want:
                    widths = [(0, 0)] * a.ndim
                    widths[d] = (0, int(want) - a.shape[d])
                    a = np.pad(a, widths, constant_values=samples.pads[j])
            feed[name] = a.astype(dtype, copy=False)
        out.append(feed)
    return out


class ModuleNames:
    """Maps the names converters leave in model files back to PyTorch module paths.

    Converters fuse a convolution with the batch norm (and activation) after it and name the result
    after the last fused module; ``aliases`` maps such modules back to the layer with the weights.

    Example:
        >>> names = ModuleNames(model, example)           # doctest: +SKIP
        >>> names.resolve("backbone._bn0")                # doctest: +SKIP
        'backbone._conv_stem'
    """

    def __init__(self, model: torch.nn.Module | None = None, example: Any = None) -> None:
        self.modules: dict[str, Any] = {}
        self.aliases: dict[str, str] = {}
        if model is None:
            return
        self.modules = dict(model.named_modules())
        if example is not None:
            self._trace_aliases(model, example)

    def _trace_aliases(self, model: Any, example: Any) -> None:
        import torch

        # tensor id -> (producing module, the tensor: kept alive so that its id is not reused)
        produced: dict[int, tuple[str, Any]] = {}
        handles = []

        def hook(name: str) -> Any:
            def fn(mod: Any, inputs: Any, output: Any) -> None:
                src = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
                if src is not None and id(src) in produced and not _has_weight(mod):
                    origin = produced[id(src)][0]
                    if not name.startswith(origin + "."):  # not a child of the producer
                        self.aliases.setdefault(name, self.aliases.get(origin, origin))
                if isinstance(output, torch.Tensor):
                    produced[id(output)] = (name, output)

            return fn

        # every module, not only leaves: a same-padding convolution holds a padding child and
        # computes the convolution itself
        for name, mod in self.modules.items():
            if name:
                handles.append(mod.register_forward_hook(hook(name)))
        try:
            with torch.no_grad():
                model(*example) if isinstance(example, tuple | list) else model(example)
        except Exception:  # naming is cosmetic: never fail a build over it
            self.aliases.clear()
        finally:
            for h in handles:
                h.remove()
        # only batch norms fold into the layer before them; activations stay separate layers
        self.aliases = {
            k: v for k, v in self.aliases.items() if "Norm" in type(self.modules[k]).__name__
        }

    def resolve(self, path: str | None) -> str | None:
        """The module with the weights for a (possibly fused) module path."""
        if not path:
            return None
        return self.aliases.get(path, path)

    def from_tflite(self, tensor_name: str) -> str | None:
        """The module path in a litert-torch tensor name (``Root/pkg.Type_attr/pkg.Type_attr;...``)."""
        if not self.modules:
            return None
        best = None
        for part in tensor_name.split(";"):
            path = self._walk_tflite(part)
            while path and "." in path and not _has_weight(self.modules.get(path)):
                parent = path.rsplit(".", 1)[0]
                if not _has_weight(self.modules.get(parent)):
                    break
                path = parent  # e.g. the padding module inside a same-padding convolution
            if path and (best is None or _has_weight(self.modules.get(path))):
                best = path
        return self.resolve(best)

    def _walk_tflite(self, name: str) -> str | None:
        comps = [c for c in name.split("/") if c][1:]  # drop the root module
        path = ""
        for comp in comps:
            comp = re.sub(r"(;\d*)+$", "", comp)
            children = [
                n
                for n in self.modules
                if n.startswith(path) and n.count(".") == path.count(".") + (1 if path else 0)
            ]
            found = None
            for child in children:
                attr = child.rsplit(".", 1)[-1]
                cls = type(self.modules[child]).__name__
                if re.search(
                    rf"(^|\.){re.escape(cls)}_{re.escape(attr)}(_\d+)?$", comp
                ) or comp.endswith(f"{cls}_{attr}"):
                    found = child
                    break
            if found is None:
                break
            path = found + "."
        return path.rstrip(".") or None


def display_name(module: str | None, op: str, fallback: str, weighted: bool) -> str:
    """How the report names a layer: the module for weighted ops (``features.3``), else
    module and operator (``backbone._blocks.3:Add``), else the format's own node name."""
    if module and weighted:
        return module
    if module:
        return f"{module}:{op}"
    return fallback


def _has_weight(mod: Any) -> bool:
    w = getattr(mod, "weight", None)
    return w is not None and getattr(w, "ndim", 0) >= 2
