"""``edgesmith build``: recipe -> model -> stages -> export -> parity and accuracy -> bundles -> report.

Everything is written into a temporary sibling of the output folder, which is renamed into place
only when every check passed (DESIGN.md section 9).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.bundling import GOLDEN_CANDIDATES, _dropped_formats, _write_bundle
from edgesmith.checks import Check, failed, failure_hint
from edgesmith.errors import CheckFailed, DataError
from edgesmith.export.evaluate import (
    EVAL_BATCH,
    Artifact,
    Evaluator,
    OutputsInfo,
    eval_inputs,
)
from edgesmith.feeds import InputLayout, example_arrays
from edgesmith.fsutil import atomic_dir, check_output_dir
from edgesmith.metrics import Metric, get_metric
from edgesmith.progress import echo
from edgesmith.schema import Recipe

# Artifact and Evaluator live in edgesmith.export.evaluate (below the stages); names kept here
__all__ = ["Artifact", "Evaluator", "build", "prepare"]

log = logging.getLogger(__name__)

_eval_inputs = eval_inputs  # the name edgesmith.cli's export command imports


@dataclass
class Prepared:
    """The recipe's model, data and metric, loaded and checked against each other.

    ``examples`` are batch-1 inputs (one tensor per model input, symbolic dimensions at their
    ``example`` size) for tracing, MACs and latency; ``example`` is the one tensor of a one-input
    model (else the tuple). ``eval_inputs``/``eval_targets`` hold the evaluation set.
    """

    recipe: Recipe
    model: Any
    data: Any
    metric: Metric
    example: Any
    profile: Any
    threads: int | None
    examples: tuple[Any, ...] = ()
    layouts: list[InputLayout] = field(default_factory=list)
    outputs: OutputsInfo = field(default_factory=OutputsInfo)
    eval_inputs: Any = None
    eval_targets: Any = None

    def example_at(self, at: str) -> tuple[Any, ...]:
        """The example inputs with symbolic dimensions at their ``example`` or ``max`` size."""
        import torch

        if at == "example" or not any(lay.ragged for lay in self.layouts):
            return self.examples
        arrays = example_arrays(self.eval_inputs, self.layouts, self._example_index, at)
        return tuple(torch.from_numpy(a) for a in arrays)

    _example_index: int = 0


def prepare(recipe: Recipe) -> Prepared:
    """Load the recipe's profile, model and data, and check they fit together."""
    import torch

    from edgesmith.data import load_datasets
    from edgesmith.feeds import layouts_of, read_split
    from edgesmith.models import build_model, check_signature, resolve_outputs
    from edgesmith.runtime.profiles import resolve_target

    profile = resolve_target(recipe.target)
    threads = profile.threads or os.cpu_count() or 1
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(threads)
    metric = get_metric(recipe.metric)
    echo(f"loading model {recipe.model.factory or recipe.model.weights}")
    model = build_model(recipe.model)
    layouts = layouts_of(recipe.model)
    check_signature(model, [lay.name for lay in layouts], named=recipe.model.inputs is not None)
    echo(f"loading data ({recipe.data.kind or recipe.data.factory})")
    first = recipe.model.first_input
    data = load_datasets(recipe.data, first.shape, first.dtype, seed=recipe.seed, layouts=layouts)
    eval_inputs, eval_targets = read_split(data.eval, layouts, "eval")
    index = _example_index(eval_inputs, layouts)
    examples = tuple(
        torch.from_numpy(a) for a in example_arrays(eval_inputs, layouts, index, "example")
    )
    shapes = ", ".join(str(list(x.shape)) for x in examples)
    try:
        with torch.inference_mode():
            returned = model(*examples)
    except Exception as exc:
        raise DataError(
            f"the model cannot run inputs of shape {shapes}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            hint="check model.input(s) (shapes, dtypes, order) and data.preprocess",
        ) from exc
    names, kinds, note = resolve_outputs(recipe.model.outputs, returned, recipe.metric)
    if note:
        echo(note)
    if recipe.trainable_head is not None and (len(layouts) > 1 or kinds != ("logits",)):
        from edgesmith.errors import RecipeError

        raise RecipeError(
            "trainable_head needs a classifier with one input and one logits output",
            hint="remove trainable_head, or use it with a one-input classifier",
        )
    example = examples[0] if len(examples) == 1 else examples
    p = Prepared(
        recipe,
        model,
        data,
        metric,
        example,
        profile,
        threads,
        examples=examples,
        layouts=layouts,
        outputs=OutputsInfo(names, kinds),
        eval_inputs=eval_inputs,
        eval_targets=eval_targets,
    )
    p._example_index = index
    return p


def _example_index(samples: Any, layouts: list[InputLayout]) -> int:
    """The evaluation sample closest in size to the ``example`` sizes (the first when fixed)."""
    if not samples.ragged:
        return 0
    want = sum(int(np.prod([ex for ex, _ in lay.sizes.values()])) for lay in layouts if lay.ragged)
    sizes = np.zeros(len(samples), np.int64)
    for col, lay in zip(samples.columns, layouts, strict=True):
        if isinstance(col, list):
            sizes += np.asarray([int(np.prod([a.shape[i - 1] for i in lay.sizes])) for a in col])
    return int(np.argmin(np.abs(sizes - want)))


def _measure(model: Any, p: Prepared) -> dict[str, Any]:
    from edgesmith.feeds import user_outputs
    from edgesmith.measure import count_macs, model_size_bytes, torch_run

    outs = torch_run(model, p.eval_inputs, EVAL_BATCH)
    outputs = user_outputs(outs, list(p.outputs.names))
    return {
        "accuracy": p.metric(outputs, p.eval_targets),
        "macs": count_macs(model, p.examples),
        "size_bytes": model_size_bytes(model),
        "outputs": outputs,
        "targets": p.eval_targets,
    }


def _export(fmt: str, model: Any, p: Prepared, path: Path) -> Path:
    """Export ``model`` to ``path``: named inputs and outputs, symbolic dimensions left free
    (TFLite, which has fixed sizes, at their ``max``)."""
    from edgesmith.export import get_exporter
    from edgesmith.export._io import dynamic_dims_of

    exporter = get_exporter(fmt)
    if fmt == "tflite":
        return exporter(model, p.example_at("max"), path)
    return exporter(
        model,
        p.examples,
        path,
        input_names=[lay.name for lay in p.layouts],
        output_names=list(p.outputs.names),
        dynamic_dims=dynamic_dims_of(p.layouts),
    )


def new_context(p: Prepared, work_dir: Path) -> Any:
    """The stages' starting context: the prepared model, a frozen copy of it as the teacher, and
    ``evaluate`` on the evaluation set with the recipe's metric."""
    from edgesmith.compress import Context
    from edgesmith.models import build_model

    teacher = copy.deepcopy(p.model).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return Context(
        recipe=p.recipe,
        model=p.model,
        teacher=teacher,
        data=p.data,
        example_input=p.example,
        evaluate=lambda m: _measure(m, p)["accuracy"],
        work_dir=work_dir,
        profile=p.profile.model_dump(),
        load_model=build_model,
        example_inputs=p.examples,
        output_kinds=p.outputs.kinds,
        output_names=p.outputs.names,
        layouts=p.layouts,
    )


def _run_stages_on_worker(recipe: Recipe) -> None:
    """torchrun ranks other than 0: run the stages (their training steps are collective), quietly.

    Rank 0 measures, exports and writes; the other ranks keep no output. Stage decisions that
    depend on measurements are made identically on every rank (or broadcast from rank 0).
    """
    import tempfile

    from edgesmith.progress import set_quiet

    set_quiet(True)
    p = prepare(recipe)
    with tempfile.TemporaryDirectory(prefix="edgesmith-rank-") as tmp:
        ctx = new_context(p, Path(tmp))
        for spec in recipe.stages:
            _run_stage(spec.name, spec.config, ctx)


def _run_stage(name: str, config: Any, ctx: Any) -> Any:
    """``STAGES[name](config).run(ctx)``, which must return a StageResult."""
    from edgesmith.compress import STAGES, StageResult
    from edgesmith.errors import EdgesmithError

    result = STAGES[name](config).run(ctx)
    if not isinstance(result, StageResult):
        raise EdgesmithError(
            f"stage '{name}' returned {type(result).__name__}, not a StageResult",
            hint="a stage's run(ctx) edits ctx.model and returns StageResult(row, checks) "
            "(docs/design.md, 'stage')",
        )
    return result


def build(
    recipe: Recipe,
    out: Path,
    force: bool = False,
    bundle_version: int | None = None,
    on_failure: Callable[[dict[str, Any]], None] | None = None,
    sign_key: Any = None,
    keep_going: bool = False,
) -> dict[str, Any] | None:
    """Run a recipe end to end and write ``out`` atomically.

    ``sign_key`` (an Ed25519 private key object or key file) signs every bundle before it appears.
    ``keep_going``: when some formats fail their checks and the others (and every stage) pass,
    write the formats that passed, mark the report ``partial`` and raise ``CheckFailed`` after
    writing; by default a build writes everything or nothing.

    Returns:
        The report (as written to ``report.json``); None on torchrun ranks other than 0, which
        only take part in the training stages.

    Raises:
        CheckFailed: an artifact failed its parity tolerance or a stage its budget; nothing is written.
        EdgesmithError: bad input (recipe, model, data).
    """
    from edgesmith.compress import StageRecord
    from edgesmith.compress.distributed import is_distributed, is_main_process
    from edgesmith.export import EXPORTERS
    from edgesmith.measure import torch_latency
    from edgesmith.report import write_report

    out = Path(out)
    check_output_dir(out, force)
    if isinstance(sign_key, str | Path):
        from edgesmith.runtime.signing import load_private_key

        sign_key = load_private_key(sign_key)  # a bad key fails now, not after the build
    if is_distributed() and not is_main_process():
        _run_stages_on_worker(recipe)
        return None  # rank 0 writes the output and the report
    t_start = time.perf_counter()
    p = prepare(recipe)
    from edgesmith.compress.quantize.hook import check_formats

    check_formats(list(recipe.export), p.profile.model_dump(), p.profile.name)  # before any work
    version = bundle_version or int(datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S"))
    with atomic_dir(out, force=force) as tmp:
        echo("measuring the baseline")
        base = _measure(p.model, p)
        lat = torch_latency(p.model, p.examples)
        report: dict[str, Any] = {
            "name": recipe.name,
            "target": p.profile.name,
            "metric": recipe.metric,
            "baseline": {
                "accuracy": base["accuracy"],
                "latency_ms": round(lat["p50"], 4),
                "size_bytes": base["size_bytes"],
                "macs": base["macs"],
            },
            "stages": [],
            "artifacts": [],
            "failures": [],
        }
        ctx = new_context(p, tmp / ".work")
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        checks: list[Check] = []  # stages', then artifact hooks', then parity: the report's order
        m = base
        for spec in recipe.stages:
            echo(f"stage {spec.name}")
            t0 = time.perf_counter()
            result = _run_stage(spec.name, spec.config, ctx)
            m = _measure(ctx.model, p)
            record = StageRecord(
                spec.name,
                m["accuracy"],
                m["macs"],
                m["size_bytes"],
                time.perf_counter() - t0,
                extra=result.row,
            )
            ctx.history.append(record)
            report["stages"].append(record.to_json())
            checks += result.checks
        final = m  # the last stage's measurement is of ctx.model as the stages left it
        inputs = p.eval_inputs
        head = memory = None
        if recipe.trainable_head is not None:  # export the backbone; the head ships as arrays
            from edgesmith.heads import split_head

            split = split_head(ctx.model, recipe.trainable_head.module, p.example)
            ctx.model, head = split.backbone, split.head
            ctx.evaluate = lambda m: _measure(split.composed(m), p)["accuracy"]
            ctx.extra["trainable_head"] = split
            from edgesmith.exemplars import prepare_memory

            memory = prepare_memory(
                split.backbone, p.data, recipe.trainable_head.memory, head.feature_size
            )
        ev = Evaluator(
            recipe,
            final["outputs"],
            final["targets"],
            inputs,
            p.metric,
            p.threads,
            head=head,
            outputs=p.outputs,
            layouts=p.layouts,
            timing=[x.numpy() for x in p.examples],
        )
        artifacts: list[Artifact] = []
        stage_checks = list(checks)
        by_format: dict[str, list[Check]] = {}
        for fmt in recipe.export:
            spec_fmt = EXPORTERS[fmt]
            path = tmp / f"{recipe.name}-{fmt}-fp32{spec_fmt.suffix}"
            echo(f"exporting {path.name}")
            _export(fmt, ctx.model.eval(), p, path)
            art = ev.evaluate(path, fmt, "fp32")
            artifacts.append(art)
            for hook in ctx.artifact_hooks:
                derived = hook(ctx, art, ev)
                artifacts += derived.artifacts
                checks += derived.checks
                by_format.setdefault(fmt, []).extend(derived.checks)
        for art in artifacts:
            checks.append(art.parity_check())
            by_format.setdefault(art.format, []).append(checks[-1])
        dropped = _dropped_formats(stage_checks, by_format) if keep_going else {}
        if dropped:
            for art in [a for a in artifacts if a.format in dropped]:
                for f in art.files:
                    f.unlink(missing_ok=True)
                plot = art.extra.get("quantization", {}).get("sensitivity_plot")
                if plot:  # the int8 search's figure, beside the models
                    (tmp / str(plot)).unlink(missing_ok=True)
            artifacts = [a for a in artifacts if a.format not in dropped]
            report["partial"] = {
                "formats": sorted({a.format for a in artifacts}),
                "dropped": dropped,
            }
        golden_inputs = inputs[:GOLDEN_CANDIDATES]
        for art in artifacts:
            art.bundle = _write_bundle(tmp, art, p, version, golden_inputs, sign_key, head, memory)
        report["failures"] = [str(c) for c in failed(checks)]
        report["artifacts"] = [a.to_json(tmp) for a in artifacts]
        report["seconds"] = round(time.perf_counter() - t_start, 1)
        report["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        import shutil

        shutil.rmtree(tmp / ".work", ignore_errors=True)
        write_report(tmp, report)
        if report["failures"] and not dropped:
            if on_failure:
                on_failure(report)
            raise CheckFailed(
                f"{len(report['failures'])} check(s) failed: " + "; ".join(report["failures"]),
                hint="nothing was written; " + failure_hint(checks),
            )
    if dropped:  # --keep-going: the formats that passed are written; the build still failed
        if on_failure:
            on_failure(report)
        raise CheckFailed(
            f"partial build: {', '.join(sorted(dropped))} failed its checks and was left out: "
            + "; ".join(report["failures"]),
            hint=f"wrote {out} with {', '.join(report['partial']['formats'])} only "
            "(report.json 'partial'); " + failure_hint(checks),
        )
    return report
