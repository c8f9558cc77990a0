"""Model inputs and outputs as the recipe declares them: samples, batches, example inputs.

A data set yields ``(inputs, target)`` pairs. ``inputs`` is one array (one-input models), a tuple or
list in ``forward`` order, or a dict by input name; each input keeps its own dtype (int64 token ids,
bool masks are never cast). An input with a symbolic dimension (``[batch, sequence]``) may vary in
size from sample to sample: samples sharing a batch are padded with the input's ``pad`` value to
the longest, and batches group samples of similar size (bucketing), so that little is padded.

A model returns one array, or a tuple of them (one per declared output). Metrics receive the
outputs as one array (one output) or a dict by output name (several).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgesmith.errors import DataError

__all__ = [
    "InputLayout",
    "Samples",
    "concat_outputs",
    "example_arrays",
    "infer_layouts",
    "layouts_of",
    "output_list",
    "read_split",
    "sample_inputs",
    "stack_targets",
    "take_targets",
    "torch_collate",
    "user_outputs",
]


@dataclass(frozen=True)
class InputLayout:
    """One model input: name, dtype, shape (batch first; strings are symbolic), pad value, and
    the ``(example, max)`` size of each symbolic dimension after the batch, by index."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    pad: float = 0
    sizes: dict[int, tuple[int, int | None]] = field(default_factory=dict)

    @property
    def ragged(self) -> bool:
        """True when a dimension after the batch may differ between samples."""
        return bool(self.sizes)

    def manifest(self) -> dict[str, Any]:
        """The bundle manifest's extra keys for this input (read by ``edgesmith.runtime``)."""
        if not self.sizes:
            return {}
        dims = {
            str(i): {"name": str(self.shape[i]), "example": ex, **({"max": mx} if mx else {})}
            for i, (ex, mx) in self.sizes.items()
        }
        return {"pad": self.pad, "dims": dims}


def layouts_of(model: Any) -> list[InputLayout]:
    """The input layouts of a recipe's ``model`` section (``ModelConfig``)."""
    out = []
    for spec in model.input_specs():
        sizes = {
            i: (model.dims[d].example, model.dims[d].max)
            for i, d in enumerate(spec.shape)
            if i > 0 and isinstance(d, str)
        }
        pad = spec.pad if spec.pad is not None else 0
        out.append(InputLayout(str(spec.name), spec.dtype, tuple(spec.shape), pad, sizes))
    return out


def infer_layouts(dataset: Any) -> list[InputLayout]:
    """Input layouts read off a data set's first sample (for callers without a recipe): one
    input, or one per element of a tuple/list (``input_0``, ...) or dict; sizes fixed."""
    x = dataset[0][0]
    if isinstance(x, dict):
        named = list(x.items())
    elif isinstance(x, tuple | list):
        named = [(f"input_{i}", v) for i, v in enumerate(x)]
    else:
        named = [("input", x)]
    out = []
    for name, v in named:
        a = _numpy(v)
        out.append(InputLayout(str(name), str(a.dtype), ("batch", *a.shape)))
    return out


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def sample_inputs(x: Any, layouts: Sequence[InputLayout], where: str) -> tuple[np.ndarray, ...]:
    """One sample's inputs as arrays in forward order, checked against the layouts.

    Raises:
        DataError: naming the input and the fix: wrong number or names of inputs, another
            dtype, rank or fixed size.
    """
    names = [lay.name for lay in layouts]
    if isinstance(x, dict):
        missing = [n for n in names if n not in x]
        extra = [str(k) for k in x if k not in names]
        if missing or extra:
            raise DataError(
                f"{where} name{'s' if ' sample ' in f' {where} ' else ''} inputs "
                f"{sorted(map(str, x))}, but model.inputs declares "
                f"{names}" + (f" (missing {missing})" if missing else ""),
                hint="yield a dict with exactly the declared input names, or fix model.inputs",
            )
        items = [x[n] for n in names]
    elif isinstance(x, tuple | list):
        items = list(x)
    else:
        items = [x]
    if len(items) != len(layouts):
        got = "1 input" if len(items) == 1 else f"{len(items)} inputs"
        raise DataError(
            f"{where} {'holds' if ' sample ' in f' {where} ' else 'hold'} {got} but the model "
            f"takes {len(layouts)} ({', '.join(names)})",
            hint="yield (inputs, target) with inputs a tuple (or dict) of one array per model input, "
            "or fix model.inputs",
        )
    out = []
    for lay, item in zip(layouts, items, strict=True):
        a = _numpy(item)
        subject = where if len(layouts) == 1 else f"input '{lay.name}' of {where}"
        if a.dtype == object:
            raise DataError(
                f"{subject}: not a numeric array", hint="yield numpy arrays or torch tensors"
            )
        if str(a.dtype) != lay.dtype:
            raise DataError(
                f"{subject} {'has' if ' sample ' in f' {where} ' else 'have'} dtype {a.dtype} "
                f"but the model input '{lay.name}' is declared {lay.dtype}",
                hint=f"make the data yield {lay.dtype} for '{lay.name}', or fix its dtype in the "
                "recipe (inputs are never cast: token ids stay integers)",
            )
        want = lay.shape[1:]
        if a.ndim != len(want) or any(
            isinstance(w, int) and w != g for w, g in zip(want, a.shape, strict=True)
        ):
            shown = [w if isinstance(w, int) else str(w) for w in want]
            raise DataError(
                f"{subject} {'has' if ' sample ' in f' {where} ' else 'have'} shape "
                f"{list(a.shape)} but the model takes {shown} (batch first: {list(lay.shape)})",
                hint="fix the input's shape in the recipe (model.input/inputs), or "
                "data.preprocess / the data factory",
            )
        out.append(a)
    return tuple(out)


def _pad_stack(arrays: Sequence[np.ndarray], pad: float, dtype: Any = None) -> np.ndarray:
    """Stack arrays of one rank, padding each dimension to the largest with ``pad``."""
    first = arrays[0]
    shapes = {a.shape for a in arrays}
    if len(shapes) == 1:
        return np.stack(arrays).astype(dtype or first.dtype, copy=False)
    target = tuple(max(s[d] for s in shapes) for d in range(first.ndim))
    out = np.full((len(arrays), *target), pad, dtype=dtype or first.dtype)
    for i, a in enumerate(arrays):
        out[(i, *(slice(0, n) for n in a.shape))] = a
    return out


class Samples:
    """The inputs of N samples: per input, one stacked array (fixed size) or a list of arrays
    (a symbolic dimension varies). Indexing with an int, slice or index array gives a subset.

    Example:
        >>> s = Samples.of(np.zeros((10, 3), np.float32))
        >>> len(s[:4]), s.batch(np.arange(2))[0].shape
        (4, (2, 3))
    """

    def __init__(
        self,
        columns: Sequence[np.ndarray | list[np.ndarray]],
        names: Sequence[str] | None = None,
        pads: Sequence[float] | None = None,
    ) -> None:
        self.columns = list(columns)
        self.names = list(
            names
            or (["input"] if len(columns) == 1 else [f"input_{i}" for i in range(len(columns))])
        )
        self.pads = list(pads or [0] * len(columns))
        lengths = {len(c) for c in self.columns}
        if len(lengths) > 1:
            raise DataError(
                f"inputs hold different sample counts: {sorted(lengths)}",
                hint="one entry per sample",
            )
        self._n = lengths.pop() if lengths else 0

    @classmethod
    def of(cls, x: Any) -> Samples:
        """``x`` as Samples: Samples, one array (one input), or a sequence of arrays."""
        if isinstance(x, Samples):
            return x
        if isinstance(x, tuple | list):
            return cls([np.asarray(a) for a in x])
        return cls([np.asarray(x)])

    @classmethod
    def from_items(
        cls, items: Sequence[Sequence[np.ndarray]], layouts: Sequence[InputLayout]
    ) -> Samples:
        """Samples from per-sample input tuples (without the batch dimension)."""
        columns: list[np.ndarray | list[np.ndarray]] = []
        for j, lay in enumerate(layouts):
            col = [item[j] for item in items]
            if len({a.shape for a in col}) > 1:
                columns.append(col)
            else:
                columns.append(
                    np.stack(col)
                    if col
                    else np.zeros(
                        (0, *[d if isinstance(d, int) else 0 for d in lay.shape[1:]]), lay.dtype
                    )
                )
        return cls(columns, [lay.name for lay in layouts], [lay.pad for lay in layouts])

    def __len__(self) -> int:
        return self._n

    @property
    def ragged(self) -> bool:
        return any(isinstance(c, list) for c in self.columns)

    def __getitem__(self, idx: Any) -> Samples:
        if isinstance(idx, int | np.integer):
            idx = np.asarray([int(idx)])
        cols: list[np.ndarray | list[np.ndarray]] = []
        for c in self.columns:
            if isinstance(c, list):
                sel = range(len(c))[idx] if isinstance(idx, slice) else np.asarray(idx).tolist()
                cols.append([c[i] for i in sel])
            else:
                cols.append(c[idx])
        return Samples(cols, self.names, self.pads)

    def sizes(self) -> np.ndarray:
        """Elements per sample over the varying inputs (what bucketing sorts by)."""
        total = np.zeros(len(self), np.int64)
        for c in self.columns:
            if isinstance(c, list):
                total += np.asarray([a.size for a in c], np.int64)
        return total

    def batch(self, idx: np.ndarray) -> list[np.ndarray]:
        """The samples ``idx`` stacked, one array per input (padded where sizes differ)."""
        out = []
        for c, pad in zip(self.columns, self.pads, strict=True):
            if isinstance(c, list):
                out.append(_pad_stack([c[i] for i in idx], pad))
            else:
                out.append(c[idx])
        return out

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """``(indices, arrays)`` batches of at most ``size`` samples; with varying sizes, samples
        of similar size go together (sorted by size, stable)."""
        order = np.argsort(self.sizes(), kind="stable") if self.ragged else np.arange(len(self))
        for start in range(0, len(self), max(1, size)):
            idx = order[start : start + size]
            yield idx, self.batch(idx)

    def arrays(self) -> list[np.ndarray]:
        """Every sample stacked, one array per input (padded to the largest where sizes differ)."""
        return self.batch(np.arange(len(self)))

    def typical(self) -> int:
        """The index of a sample of median size (the first sample when sizes do not vary)."""
        if not self.ragged or not len(self):
            return 0
        order = np.argsort(self.sizes(), kind="stable")
        return int(order[len(order) // 2])


def read_split(dataset: Any, layouts: Sequence[InputLayout], where: str) -> tuple[Samples, Any]:
    """Every sample of ``dataset`` as :class:`Samples` plus the stacked targets.

    Raises:
        DataError: a sample that does not fit the declared inputs (see :func:`sample_inputs`).
    """
    items, targets = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise DataError(
                f"{where} sample {i} is a {type(item).__name__}, not an (inputs, target) pair",
                hint="a data set yields (inputs, target); inputs is one array, or a tuple/dict of them",
            )
        items.append(sample_inputs(item[0], layouts, f"{where} sample {i}"))
        targets.append(item[1])
    return Samples.from_items(items, layouts), stack_targets(targets)


def stack_targets(targets: Sequence[Any]) -> Any:
    """Per-sample targets stacked: an array, or a tuple/dict of arrays when targets are tuples or
    dicts (one per output); sizes that differ are padded with 0."""
    if not targets:
        return np.zeros((0,))
    first = targets[0]
    if isinstance(first, dict):
        return {k: stack_targets([t[k] for t in targets]) for k in first}
    if isinstance(first, tuple | list):
        return tuple(stack_targets([t[j] for t in targets]) for j in range(len(first)))
    arrays = [_numpy(t) for t in targets]
    return _pad_stack(arrays, 0)


def take_targets(targets: Any, idx: Any) -> Any:
    """A subset of stacked targets (array, tuple or dict of arrays)."""
    if isinstance(targets, dict):
        return {k: take_targets(v, idx) for k, v in targets.items()}
    if isinstance(targets, tuple):
        return tuple(take_targets(v, idx) for v in targets)
    return np.asarray(targets)[idx]


def output_list(out: Any, names: Sequence[str] | None = None) -> list[np.ndarray]:
    """A model's or a metric's outputs as a list in output order (array, tuple/list, or dict)."""
    if isinstance(out, dict):
        keys = list(names) if names else list(out)
        return [_numpy(out[k]) for k in keys]
    if isinstance(out, tuple | list):
        return [_numpy(o) for o in out]
    return [_numpy(out)]


def user_outputs(outs: Sequence[np.ndarray], names: Sequence[str]) -> Any:
    """What a metric receives: the array (one output), or a dict by output name."""
    if len(outs) == 1:
        return outs[0]
    return dict(zip(names, outs, strict=True))


def concat_outputs(
    chunks: Sequence[tuple[np.ndarray, list[np.ndarray]]], n: int
) -> list[np.ndarray]:
    """Per-batch ``(indices, outputs)`` put back in sample order: one array per output (outputs
    whose sizes differ between batches are padded with 0 to the largest)."""
    if not chunks:
        return []
    order = np.concatenate([np.asarray(c[0]) for c in chunks])
    outs = []
    for j in range(len(chunks[0][1])):
        parts = [np.atleast_1d(np.asarray(c[1][j])) for c in chunks]
        tails = {p.shape[1:] for p in parts}
        if len(tails) > 1:
            target = tuple(max(t[d] for t in tails) for d in range(len(parts[0].shape) - 1))
            padded = []
            for p in parts:
                q = np.zeros((len(p), *target), p.dtype)
                q[(slice(None), *(slice(0, k) for k in p.shape[1:]))] = p
                padded.append(q)
            parts = padded
        stacked = np.concatenate(parts)
        if len(stacked) != len(order):  # an output without a batch dimension
            outs.append(stacked)
            continue
        out = np.empty_like(stacked)
        out[order] = stacked
        outs.append(out[:n])
    return outs


def _fit(a: np.ndarray, lay: InputLayout, target: dict[int, int]) -> np.ndarray:
    """One sample's input padded or cut to ``target`` sizes along its symbolic dims."""
    for i, size in target.items():
        axis = i - 1
        have = a.shape[axis]
        if have > size:
            a = np.take(a, np.arange(size), axis=axis)
        elif have < size:
            widths = [(0, 0)] * a.ndim
            widths[axis] = (0, size - have)
            a = np.pad(a, widths, constant_values=np.asarray(lay.pad).astype(a.dtype))
    return a


def example_arrays(
    samples: Samples, layouts: Sequence[InputLayout], index: int = 0, at: str = "example"
) -> list[np.ndarray]:
    """One sample as batch-1 arrays with its symbolic dims at their ``example`` (or ``max``) size."""
    arrays = [a[0] for a in samples.batch(np.asarray([index]))]
    out = []
    for a, lay in zip(arrays, layouts, strict=True):
        target = {i: (mx if at == "max" and mx else ex) for i, (ex, mx) in lay.sizes.items()}
        batch = lay.shape[0] if isinstance(lay.shape[0], int) else 1
        one = _fit(a, lay, target)[None]
        out.append(np.concatenate([one] * batch) if batch > 1 else one)
    return out


def torch_collate(layouts: Sequence[InputLayout]) -> Callable[[list[Any]], tuple[Any, Any]]:
    """A DataLoader ``collate_fn`` for ``(inputs, target)`` samples: inputs stacked per input
    (padded with each input's ``pad`` where sizes differ), a tuple for several inputs; targets by
    torch's default collation (padded with 0 where sizes differ)."""
    import torch
    from torch.utils.data import default_collate

    def collate(batch: list[Any]) -> tuple[Any, Any]:
        xs = [sample_inputs(x, layouts, "training samples") for x, _ in batch]
        inputs = tuple(
            torch.from_numpy(_pad_stack([x[j] for x in xs], lay.pad))
            for j, lay in enumerate(layouts)
        )
        ys = [y for _, y in batch]
        try:
            targets = default_collate(ys)
        except RuntimeError:  # targets of different sizes
            targets = torch.from_numpy(stack_targets(ys))
        return (inputs[0] if len(inputs) == 1 else inputs), targets

    return collate
