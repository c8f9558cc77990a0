"""Exported files measured against the PyTorch reference: :class:`Evaluator` makes :class:`Artifact`s.

The build evaluates every exported file (and every variant an artifact hook derives from it) the
same way: loaded with ``edgesmith.runtime``, run over the evaluation set, compared with the
PyTorch outputs (parity), scored with the recipe's metric and timed at batch 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgesmith.checks import PARITY_HINT, Check
from edgesmith.export.parity import Parity, compare
from edgesmith.progress import track

if TYPE_CHECKING:
    from edgesmith.feeds import Samples
    from edgesmith.metrics import Metric
    from edgesmith.schema import Recipe

__all__ = [
    "EVAL_BATCH",
    "Artifact",
    "Evaluator",
    "OutputsInfo",
    "artifact_outputs",
    "eval_inputs",
    "feed_names",
    "inputs_manifest",
    "match_layouts",
]

EVAL_BATCH = 256
RAGGED_BATCH = 16  # samples per batch when their sizes vary (token sequences)


@dataclass
class Artifact:
    """One exported model file (plus side files) with its measurements."""

    format: str
    precision: str
    path: Path
    files: list[Path]
    size_bytes: int
    accuracy: float
    latency_ms: float
    parity: Parity
    latency: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    bundle: str | None = None
    parity_source: str = ""  # which tolerance applied and where it came from, when not the recipe's

    def parity_check(self) -> Check:
        """The parity tolerance of the recipe, checked on the whole evaluation set."""
        source = f" ({self.parity_source})" if self.parity_source else ""
        return Check(
            "export",
            "parity",
            None,
            None,
            self.parity.passed,
            PARITY_HINT,
            f"{self.path.name}: parity failed: {self.parity.reason}{source}",
        )

    def to_json(self, root: Path) -> dict[str, Any]:
        return {
            "format": self.format,
            "precision": self.precision,
            "path": str(self.path.relative_to(root)),
            "bundle": self.bundle,
            "size_bytes": self.size_bytes,
            "accuracy": round(self.accuracy, 6),
            "latency_ms": round(self.latency_ms, 4),
            "latency": {k: round(v, 4) for k, v in self.latency.items()},
            "parity": self.parity.to_json(),
            **self.extra,
        }


def eval_inputs(dataset: Any, layouts: Sequence[Any] | None = None) -> Any:
    """Every input of an evaluation set: one stacked array for a one-input model of fixed size
    (as before), else :class:`~edgesmith.feeds.Samples`."""
    from edgesmith.feeds import infer_layouts, read_split

    samples, _ = read_split(dataset, layouts or infer_layouts(dataset), "evaluation")
    if len(samples.columns) == 1 and not samples.ragged:
        return samples.columns[0]
    return samples


@dataclass(frozen=True)
class OutputsInfo:
    """What the build knows about the model's outputs: names and kinds, in forward order."""

    names: tuple[str, ...] = ("output",)
    kinds: tuple[str, ...] = ("logits",)


def match_layouts(specs: Sequence[Any], layouts: Sequence[Any]) -> list[Any]:
    """For each input of a model file (in its order), the recipe's input layout it is: by equal
    name, else by a name the file's contains (TFLite's ``serving_default_input_ids:0``), else by
    position; None where nothing matches."""
    found: list[Any] = []
    used: set[int] = set()
    for i, spec in enumerate(specs):
        pick = next((j for j, lay in enumerate(layouts) if lay.name == spec.name), None)
        if pick is None:
            hits = [j for j, lay in enumerate(layouts) if j not in used and lay.name in spec.name]
            pick = hits[0] if len(hits) == 1 else None
        if pick is None and i < len(layouts) and i not in used:
            pick = i
        if pick is not None:
            used.add(pick)
        found.append(layouts[pick] if pick is not None else None)
    return found


def feed_names(model: Any, layouts: Sequence[Any]) -> list[str]:
    """The model file's input names in the recipe's input order."""
    matched = match_layouts(model.inputs, layouts)
    by_layout = {id(lay): spec.name for spec, lay in zip(model.inputs, matched, strict=True) if lay}
    return [by_layout.get(id(lay), model.inputs[i].name) for i, lay in enumerate(layouts)]


def inputs_manifest(model: Any, layouts: Sequence[Any]) -> list[dict[str, Any]]:
    """The manifest's ``inputs`` for a loaded artifact: the file's names and dtypes, the recipe's
    names for symbolic dimensions, and how the runtime fits inputs to the file (``pad``, ``dims``,
    ``cast_from``: TFLite's fixed sequence length and int32 token ids)."""
    from edgesmith.runtime.specs import TensorSpec

    out = []
    for spec, lay in zip(model.inputs, match_layouts(model.inputs, layouts), strict=True):
        shape: list[int | str] = ["batch"]
        for i, d in enumerate(spec.shape[1:], 1):
            named = lay is not None and i < len(lay.shape) and isinstance(lay.shape[i], str)
            shape.append(str(lay.shape[i]) if named and not isinstance(d, int) else d)
        entry = TensorSpec(spec.name, tuple(shape), spec.dtype).to_json()
        if lay is not None:
            entry.update(lay.manifest())
            if lay.name != spec.name and len(layouts) > 1:
                entry["alias"] = lay.name  # the recipe's name, which load() also takes
            if lay.dtype != spec.dtype and np.dtype(lay.dtype).kind in "iub":
                entry["cast_from"] = [lay.dtype]
        out.append(entry)
    return out


def artifact_outputs(
    model: Any,
    samples: Samples,
    head: Any = None,
    label: str | None = None,
    names: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """The outputs of a loaded ``edgesmith.runtime`` model on every sample (one array per output,
    in sample order): batches of similar-sized samples, as large as the model takes. ``names``:
    the model's input names in the samples' order (default: positional)."""
    from edgesmith.feeds import concat_outputs, output_list

    fixed = model.inputs[0].shape[0] if model.inputs else None
    # a model exported with a fixed batch runs that many; samples of varying size run in small
    # batches of similar sizes (little padding)
    step = fixed if isinstance(fixed, int) else RAGGED_BATCH if samples.ragged else EVAL_BATCH
    batches = samples.batches(step)
    if label:
        batches = track(batches, label, (len(samples) + step - 1) // step)
    order = [o.name for o in model.outputs]
    chunks = []
    for idx, arrays in batches:
        if names is not None and len(arrays) > 1:
            got = model.run(dict(zip(names, arrays, strict=True)))
            out = [np.asarray(got[n]) for n in order]
        else:
            out = output_list(model(*arrays))
        if head is not None:  # trainable_head builds export the backbone
            out = [np.asarray(head(out[0]))]
        chunks.append((idx, out))
    return concat_outputs(chunks, len(samples))


class Evaluator:
    """Measures exported files against the PyTorch reference on the evaluation set.

    Args:
        recipe: the recipe (parity tolerances).
        reference / targets: the PyTorch model's outputs (one array, or a dict by output name)
            and the targets, over the evaluation set.
        inputs: the evaluation inputs: one array (one input) or :class:`~edgesmith.feeds.Samples`.
        metric: the recipe's metric.
        threads: runtime threads.
        head: a trainable-head build's numpy head, applied to the backbone's outputs.
        outputs: output names and kinds (default: one ``logits`` output).
        layouts: the recipe's inputs (``edgesmith.feeds.InputLayout``): how the runtime pads,
            cuts or casts them for a file (e.g. TFLite's fixed sequence length), fed by name.
        timing: the batch-1 inputs latency is measured on (default: the first sample).
    """

    def __init__(
        self,
        recipe: Recipe,
        reference: Any,
        targets: Any,
        inputs: Any,
        metric: Metric,
        threads: int | None,
        head: Any = None,
        *,
        outputs: OutputsInfo | None = None,
        layouts: Sequence[Any] | None = None,
        timing: list[np.ndarray] | None = None,
    ) -> None:
        from edgesmith.feeds import Samples

        self.recipe, self.reference, self.targets = recipe, reference, targets
        self.inputs = Samples.of(inputs)
        self.metric, self.threads = metric, threads
        # trainable_head builds export the backbone: outputs are head(backbone(x)), in numpy
        self.head = head
        self.info = outputs or OutputsInfo()
        self.layouts = list(layouts or [])
        self.timing = timing if timing is not None else self.inputs.batch(np.arange(1))

    def load(self, path: Path) -> Any:
        """Load an artifact file with the runtime, told how to fit inputs to it."""
        from edgesmith.runtime import load

        model = load(path, threads=self.threads, device="cpu")
        self.declare(model)
        return model

    def declare(self, model: Any) -> None:
        """Tell a loaded model how the recipe's inputs fit it (names, TFLite's fixed length and
        int32 ids); nothing for a recipe without declared inputs."""
        if self.layouts:
            model.declare_inputs(inputs_manifest(model, self.layouts))

    def names(self, model: Any) -> list[str] | None:
        """The loaded model's input names in the recipe's order (None: positional)."""
        return feed_names(model, self.layouts) if self.layouts else None

    def outputs(
        self, model: Any, samples: Samples | None = None, label: str | None = None
    ) -> list[np.ndarray]:
        """A loaded artifact's outputs on ``samples`` (default: the evaluation set)."""
        return artifact_outputs(
            model, self.inputs if samples is None else samples, self.head, label, self.names(model)
        )

    def reference_list(self, idx: Any = None) -> list[np.ndarray]:
        """The reference outputs (of samples ``idx``), one array per output."""
        from edgesmith.feeds import output_list, take_targets

        ref = self.reference if idx is None else take_targets(self.reference, idx)
        return output_list(ref, list(self.info.names) if isinstance(ref, dict) else None)

    def tolerances(self, precision: str, override: Any = None) -> list[dict[str, Any]]:
        """The parity tolerance of each output for a ``precision`` artifact (``override``: a
        ``ParityTolerance`` in place of the recipe's, such as the int8 contract's; fields of
        other kinds than logits it leaves out take their kind's defaults)."""
        from edgesmith.schema import parity_tolerance

        parity = self.recipe.parity if override is None else {precision: override}
        return [parity_tolerance(parity, precision, k) for k in self.info.kinds]

    def user_form(self, outs: list[np.ndarray]) -> Any:
        """Outputs as the metric takes them: one array, or a dict by output name."""
        from edgesmith.feeds import user_outputs

        return user_outputs(outs, list(self.info.names))

    def logits(self, model: Any, x: Any) -> Any:
        """The artifact's outputs for inputs ``x`` (one array, or a sequence of arrays: one per
        input), with the numpy head applied when there is one."""
        args = list(x) if isinstance(x, list | tuple) else [x]
        names = self.names(model)
        if names is not None and len(args) > 1:
            got = model.run(dict(zip(names, args, strict=True)))
            return tuple(got[o.name] for o in model.outputs)
        out = model(*args)
        if self.head is not None:
            return self.head(np.asarray(out))
        return out

    def latency(self, model: Any, max_seconds: float = 15.0) -> dict[str, float]:
        """Batch-1 latency of a loaded artifact on the timing inputs (milliseconds)."""
        from edgesmith.runtime.bench import time_fn

        one = self.timing
        return time_fn(
            lambda: self.logits(model, one), warmup=20, runs=200, max_seconds=max_seconds
        )

    def evaluate(
        self,
        path: Path,
        fmt: str,
        precision: str,
        files: list[Path] | None = None,
        extra: dict[str, Any] | None = None,
        tolerance: Any = None,
        parity_source: str = "",
    ) -> Artifact:
        """Load ``path`` with the runtime, run the evaluation set, and compare with the reference.

        ``tolerance`` replaces the recipe's parity tolerance for ``precision`` (the int8 contract,
        ``compress/quantize/contract.py``); ``parity_source`` names it in a failure message.
        """
        model = self.load(path)
        outs = self.outputs(model, label=f"evaluate {path.name}")
        parity = compare(
            self.reference_list(),
            outs,
            self.info.kinds,
            self.tolerances(precision, tolerance),
            self.info.names,
        )
        accuracy = self.metric(self.user_form(outs), self.targets)
        lat = self.latency(model)
        if not files:
            from edgesmith.export import EXPORTERS

            files = EXPORTERS[fmt].files(path) if fmt in EXPORTERS else [path]
        return Artifact(
            fmt,
            precision,
            path,
            files,
            sum(f.stat().st_size for f in files),
            accuracy,
            lat["p50"],
            parity,
            latency={k: lat[k] for k in ("p50", "p90", "p99")},
            extra=dict(extra or {}),
            parity_source=parity_source,
        )
