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

from edgesmith.errors import CheckFailed, DataError
from edgesmith.export.parity import Parity, compare_outputs
from edgesmith.fsutil import atomic_dir, check_output_dir
from edgesmith.metrics import Metric, get_metric
from edgesmith.progress import echo, track
from edgesmith.recipe import Recipe

__all__ = ["Artifact", "Evaluator", "build", "prepare"]

log = logging.getLogger(__name__)

EVAL_BATCH = 256
GOLDEN_CANDIDATES = 64  # evaluation inputs the golden samples are picked from (edgesmith.golden)


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


class Evaluator:
    """Measures exported files against the PyTorch reference on the evaluation set."""

    def __init__(
        self,
        recipe: Recipe,
        reference: np.ndarray,
        targets: np.ndarray,
        inputs: np.ndarray,
        metric: Metric,
        threads: int | None,
        head: Any = None,
    ) -> None:
        self.recipe, self.reference, self.targets, self.inputs = recipe, reference, targets, inputs
        self.metric, self.threads = metric, threads
        # trainable_head builds export the backbone: outputs are head(backbone(x)), in numpy
        self.head = head

    def logits(self, model: Any, x: np.ndarray) -> np.ndarray:
        """The artifact's outputs for ``x`` (with the numpy head applied when there is one)."""
        out = np.asarray(model(x))
        return out if self.head is None else self.head(out)

    def evaluate(
        self,
        path: Path,
        fmt: str,
        precision: str,
        files: list[Path] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Artifact:
        """Load ``path`` with the runtime, run the evaluation set, and compare with the reference."""
        from edgesmith.runtime import load

        model = load(path, threads=self.threads, device="cpu")
        fixed = model.inputs[0].shape[0]
        step = (
            fixed if isinstance(fixed, int) else EVAL_BATCH
        )  # a model exported with a fixed batch
        outs = [
            self.logits(model, self.inputs[i : i + step])
            for i in track(range(0, len(self.inputs), step), f"evaluate {path.name}")
        ]
        out = np.concatenate(outs)
        tol = self.recipe.parity.get(precision) or self.recipe.parity["int8"]
        parity = compare_outputs(self.reference, out, tol.top1_agreement, tol.max_abs_diff)
        accuracy = self.metric(out, self.targets)
        one = self.inputs[:1]
        from edgesmith.runtime.bench import time_fn

        lat = time_fn(lambda: self.logits(model, one), warmup=20, runs=200, max_seconds=15.0)
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
        )


@dataclass
class Prepared:
    recipe: Recipe
    model: Any
    data: Any
    metric: Metric
    example: Any
    profile: Any
    threads: int | None


def prepare(recipe: Recipe) -> Prepared:
    """Load the recipe's profile, model and data, and check they fit together."""
    import torch

    from edgesmith.data import load_datasets
    from edgesmith.devices.profiles import resolve_target
    from edgesmith.models import build_model

    profile = resolve_target(recipe.target)
    threads = profile.threads or os.cpu_count() or 1
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(threads)
    metric = get_metric(recipe.metric)
    echo(f"loading model {recipe.model.factory or recipe.model.weights}")
    model = build_model(recipe.model)
    echo(f"loading data ({recipe.data.kind or recipe.data.factory})")
    data = load_datasets(
        recipe.data, recipe.model.input.shape, recipe.model.input.dtype, seed=recipe.seed
    )
    example = torch.as_tensor(data.eval[0][0])[None]
    try:
        with torch.inference_mode():
            model(example)
    except Exception as exc:
        raise DataError(
            f"the model cannot run an input of shape {list(example.shape)}: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            hint="check model.input.shape and data.preprocess",
        ) from exc
    return Prepared(recipe, model, data, metric, example, profile, threads)


def _measure(model: Any, p: Prepared) -> dict[str, Any]:
    from edgesmith.measure import count_macs, model_size_bytes, torch_outputs

    outputs, targets = torch_outputs(model, p.data.eval, EVAL_BATCH)
    return {
        "accuracy": p.metric(outputs, targets),
        "macs": count_macs(model, p.example),
        "size_bytes": model_size_bytes(model),
        "outputs": outputs,
        "targets": targets,
    }


def _eval_inputs(dataset: Any) -> np.ndarray:
    from edgesmith.measure import batches

    return np.concatenate([x for x, _ in batches(dataset, EVAL_BATCH)])


def _write_bundle(
    out: Path,
    art: Artifact,
    p: Prepared,
    version: int,
    golden_inputs: np.ndarray,
    sign_key: Any = None,
    head: Any = None,
) -> str:
    from edgesmith.golden import HOLDS_ACROSS, golden_tolerance, pick_golden
    from edgesmith.runtime import load
    from edgesmith.runtime.bundle import write_bundle
    from edgesmith.runtime.specs import TensorSpec

    model = load(art.path, device="cpu", threads=p.threads)
    fixed = model.inputs[0].shape[0]
    step = fixed if isinstance(fixed, int) else len(golden_inputs)
    expected = np.concatenate(
        [np.asarray(model(golden_inputs[i : i + step])) for i in range(0, len(golden_inputs), step)]
    )
    if head is not None:
        expected = head(expected)
    tolerance = golden_tolerance(art.precision, expected)
    chosen = pick_golden(expected, tolerance["atol"])
    rel = f"bundles/{art.path.stem}"
    golden_file = out / ".work" / f"golden-{art.path.stem}.npz"
    golden_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(golden_file, inputs=golden_inputs[chosen], outputs=expected[chosen])
    golden = {"file": "golden.npz", **tolerance, "holds_across": HOLDS_ACROSS}
    files = {f.name: f for f in art.files}
    files["golden.npz"] = golden_file
    in_specs = [
        TensorSpec(s.name, ("batch", *s.shape[1:]), s.dtype).to_json() for s in model.inputs
    ]
    manifest = {
        "name": p.recipe.name,
        "version": version,
        "target": p.profile.name,
        "format": art.format,
        "precision": art.precision,
        "model": art.path.name,
        "inputs": in_specs,
        "outputs": [s.to_json() for s in model.outputs],
        "preprocess": p.data.preprocess,
        "labels": p.data.labels,
        "golden": golden,
        "metrics": {
            "metric": p.recipe.metric,
            "accuracy": art.accuracy,
            "latency_ms": art.latency_ms,
            "size_bytes": art.size_bytes,
            "parity": art.parity.to_json(),
        },
        "build": {"edgesmith": __import__("edgesmith").__version__, "recipe": p.recipe.name},
    }
    if head is not None:
        _add_head(manifest, files, head, model.outputs[0].name, p, out)
    write_bundle(
        out / rel, {k: v for k, v in manifest.items() if v is not None}, files, sign_key=sign_key
    )
    return rel


def _add_head(
    manifest: dict[str, Any],
    files: dict[str, Path],
    head: Any,
    feature_output: str,
    p: Prepared,
    out: Path,
) -> None:
    """A trainable-head bundle: the head's arrays, its manifest entry, and logits as the output."""
    from edgesmith.runtime.head import HEAD_FILE

    cfg = p.recipe.trainable_head
    assert cfg is not None
    path = head.save(out / ".work" / HEAD_FILE)
    files[HEAD_FILE] = path
    manifest["outputs"] = [{"name": "logits", "shape": ["batch", head.classes], "dtype": "float32"}]
    manifest["trainable_head"] = head.spec(
        feature_output,
        policy=cfg.policy,
        trained={
            "by": "build",
            "at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "recipe": p.recipe.name,
            "module": cfg.module,
        },
    )


def new_context(p: Prepared, work_dir: Path) -> Any:
    """The stages' starting context: the prepared model, a frozen copy of it as the teacher, and
    ``evaluate`` on the evaluation set with the recipe's metric."""
    from edgesmith.compress import Context

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
    )


def _run_stages_on_worker(recipe: Recipe) -> None:
    """torchrun ranks other than 0: run the stages (their training steps are collective), quietly.

    Rank 0 measures, exports and writes; the other ranks keep no output. Stage decisions that
    depend on measurements are made identically on every rank (or broadcast from rank 0).
    """
    import tempfile

    from edgesmith.compress import STAGES
    from edgesmith.progress import set_quiet

    set_quiet(True)
    p = prepare(recipe)
    with tempfile.TemporaryDirectory(prefix="edgesmith-rank-") as tmp:
        ctx = new_context(p, Path(tmp))
        for spec in recipe.stages:
            ctx = STAGES[spec.name](spec.config).run(ctx)
            ctx.extra.pop("record", None)
            ctx.extra.pop("failures", None)


def build(
    recipe: Recipe,
    out: Path,
    force: bool = False,
    bundle_version: int | None = None,
    on_failure: Callable[[dict[str, Any]], None] | None = None,
    sign_key: Any = None,
) -> dict[str, Any] | None:
    """Run a recipe end to end and write ``out`` atomically.

    ``sign_key`` (an Ed25519 private key object or key file) signs every bundle before it appears.

    Returns:
        The report (as written to ``report.json``); None on torchrun ranks other than 0, which
        only take part in the training stages.

    Raises:
        CheckFailed: an artifact failed its parity tolerance or a stage its budget; nothing is written.
        EdgesmithError: bad input (recipe, model, data).
    """
    from edgesmith.compress import STAGES, StageRecord
    from edgesmith.compress.distributed import is_distributed, is_main_process
    from edgesmith.export import EXPORTERS, get_exporter
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
        lat = torch_latency(p.model, p.example)
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
        m = base
        for spec in recipe.stages:
            echo(f"stage {spec.name}")
            t0 = time.perf_counter()
            ctx = STAGES[spec.name](spec.config).run(ctx)
            m = _measure(ctx.model, p)
            record = StageRecord(
                spec.name,
                m["accuracy"],
                m["macs"],
                m["size_bytes"],
                time.perf_counter() - t0,
                extra=ctx.extra.pop("record", {}),
            )
            ctx.history.append(record)
            report["stages"].append(record.to_json())
            report["failures"] += ctx.extra.pop("failures", [])
        final = m  # the last stage's measurement is of ctx.model as the stages left it
        inputs = _eval_inputs(p.data.eval)
        head = None
        if recipe.trainable_head is not None:  # export the backbone; the head ships as arrays
            from edgesmith.heads import split_head

            split = split_head(ctx.model, recipe.trainable_head.module, p.example)
            ctx.model, head = split.backbone, split.head
            ctx.evaluate = lambda m: _measure(split.composed(m), p)["accuracy"]
            ctx.extra["trainable_head"] = split
        ev = Evaluator(
            recipe, final["outputs"], final["targets"], inputs, p.metric, p.threads, head=head
        )
        artifacts: list[Artifact] = []
        for fmt in recipe.export:
            spec_fmt = EXPORTERS[fmt]
            path = tmp / f"{recipe.name}-{fmt}-fp32{spec_fmt.suffix}"
            echo(f"exporting {path.name}")
            get_exporter(fmt)(ctx.model.eval(), (p.example,), path)
            art = ev.evaluate(path, fmt, "fp32")
            artifacts.append(art)
            for hook in ctx.artifact_hooks:
                artifacts += hook(ctx, art, ev)
        # hooks (the quantize stage's int8 variants) report budget failures the same way stages do
        report["failures"] += ctx.extra.pop("failures", [])
        golden_inputs = inputs[:GOLDEN_CANDIDATES]
        for art in artifacts:
            if not art.parity.passed:
                report["failures"].append(f"{art.path.name}: parity failed: {art.parity.reason}")
            art.bundle = _write_bundle(tmp, art, p, version, golden_inputs, sign_key, head)
        report["artifacts"] = [a.to_json(tmp) for a in artifacts]
        report["seconds"] = round(time.perf_counter() - t_start, 1)
        report["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        import shutil

        shutil.rmtree(tmp / ".work", ignore_errors=True)
        write_report(tmp, report)
        if report["failures"]:
            if on_failure:
                on_failure(report)
            budget = any("max_accuracy_drop" in f for f in report["failures"])
            raise CheckFailed(
                f"{len(report['failures'])} check(s) failed: " + "; ".join(report["failures"]),
                hint="nothing was written; "
                + (
                    "raise max_accuracy_drop (or max_float_layers), train longer, or try the qat stage"
                    if budget
                    else "relax the tolerance in the recipe ('parity:') only if you can defend it"
                ),
            )
    return report
