"""The ``prune`` stage: structured pruning to a MACs or latency target, or unstructured zeros.

Recipe contract (DESIGN.md section 9): ``- prune: {sparsity: 0.5}`` removes half of the MACs.

Options (all optional except the target)::

    - prune:
        sparsity: 0.5            # fraction of MACs to remove (unstructured: of weights to zero)
        latency_ms: 0.2          # or: batch-1 ONNX Runtime latency budget on the target profile
        method: structured       # structured | unstructured
        importance: l2           # l1 | l2 | bn_scale | taylor
        scope: layer             # layer (same fraction per layer) | global (ranked across layers)
        round_to: auto           # channel multiples: auto = the target's SIMD width in floats
                                 # (16 with AVX-512, else 8); an integer; null: free
        ignore: [classifier.1]   # layers (names or globs) whose width is kept; the output layer always is
        keep_first: false        # keep the first layer's width too
        steps: 1                 # reach the target in this many steps ...
        finetune_epochs: 0.0     # ... fine-tuning this long after each (cross-entropy)
        max_accuracy_drop: 0.05  # fail the build if accuracy falls more than this below the
                                 # model as the recipe loaded it (edgesmith.checks)
        bn_batches: 20           # recompute BatchNorm statistics on this many training batches
                                 # after pruning (0: off); SmallCNN at 50%: 77% -> 90% untrained

This module imports no torch at import time (``edgesmith recipe check`` validates options).
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from edgesmith.checks import accuracy_budget
from edgesmith.compress.base import (
    Context,
    HookResult,
    Stage,
    StageConfig,
    StageResult,
    register_stage,
)

__all__ = ["Prune", "PruneConfig", "prune_model"]

log = logging.getLogger(__name__)


class PruneConfig(StageConfig):
    """Options of the ``prune`` stage (see the module docstring)."""

    sparsity: float | None = None
    latency_ms: float | None = Field(default=None, gt=0)
    method: Literal["structured", "unstructured"] = "structured"
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = "l2"
    scope: Literal["layer", "global"] = "layer"
    round_to: Annotated[int, Field(ge=1)] | Literal["auto"] | None = "auto"
    ignore: list[str] = Field(default_factory=list)
    keep_first: bool = False
    max_layer_ratio: float = Field(default=0.9, gt=0, lt=1)
    resolution: int = Field(default=100, ge=2, le=1000)
    steps: int = Field(default=1, ge=1, le=100)
    finetune_epochs: float = Field(default=0.0, ge=0)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=64, ge=1)
    taylor_batches: int = Field(default=4, ge=1)
    bn_batches: int = Field(default=20, ge=0)
    latency_step: float = Field(default=0.05, gt=0, lt=1)
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("sparsity")
    @classmethod
    def _fraction(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v < 1:
            raise ValueError(
                f"sparsity is the fraction of MACs to remove and must lie strictly between 0 and 1, got {v}"
            )
        return v

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        if self.method == "unstructured":
            if self.sparsity is None or self.latency_ms is not None:
                raise ValueError(
                    "unstructured pruning takes 'sparsity' (the fraction of weights to zero), not 'latency_ms'"
                )
        elif (self.sparsity is None) == (self.latency_ms is None):
            raise ValueError(
                "give exactly one target: 'sparsity' (fraction of MACs to remove) or 'latency_ms'"
            )
        return self


def _loader(
    dataset: Any, batch_size: int, n_batches: int, seed: int, collate_fn: Any = None
) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=g, collate_fn=collate_fn
    )
    out = []
    for i, batch in enumerate(loader):
        if i >= n_batches:
            break
        out.append(batch)
    return out


def _task_loss(ctx: Context) -> Any:
    """The loss of the model's own task, by output kind (class logits: cross-entropy on the
    labels; embeddings, features, regression: a feature loss to the targets, else to the model
    as the recipe loaded it)."""
    from edgesmith.compress.losses import task_loss

    return task_loss(tuple(ctx.output_kinds), list(ctx.output_names), teacher=ctx.teacher)


def _finetune(ctx: Context, cfg: PruneConfig, seed: int, label: str) -> None:
    from edgesmith.compress.train import FitConfig, fit

    loss_fn = _task_loss(ctx)

    fit(
        ctx.model,
        ctx.data.train,
        loss_fn,
        FitConfig(
            epochs=cfg.finetune_epochs,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            seed=seed,
            device=cfg.device,
            bn_batches=cfg.bn_batches,
        ),
        description=label,
        collate_fn=getattr(ctx.data, "collate", None),
    )


def _onnx_latency_ms(
    model: Any, example: Any, threads: int | None, work_dir: Any, device: str = "auto"
) -> float:
    """Batch-1 p50 latency of ``model`` exported to ONNX and run by ONNX Runtime.

    Under torchrun rank 0 measures and every rank gets its number, so all take the same steps.
    """
    import tempfile
    from pathlib import Path

    from edgesmith.compress.base import distributed
    from edgesmith.export.onnx import export
    from edgesmith.runtime import load
    from edgesmith.runtime.bench import time_fn

    distributed.init_distributed(distributed.device(device))
    latency = None
    if distributed.is_main_process():
        args = tuple(example) if isinstance(example, tuple | list) else (example,)
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            # every dimension but the batch fixed at the example's size: the latency is timed there
            path = export(model.eval(), args, Path(tmp) / "probe.onnx")
            session = load(path, threads=threads, device="cpu")
            xs = [x.numpy() for x in args]
            latency = time_fn(lambda: session(*xs), warmup=20, runs=200, max_seconds=10.0)["p50"]
    return float(distributed.broadcast_object(latency))


def simd_channels(profile: dict[str, Any]) -> int:
    """Channel multiple that fills the target's vector registers with fp32: 16 with AVX-512, else 8.

    ONNX Runtime's CPU convolutions work on blocks of this many channels (NCHWc); other counts
    are padded, and measured slower than the unpruned model here (docs/benchmarks.md).
    """
    isa = [str(i).lower() for i in [*(profile.get("isa") or []), *(profile.get("isa_any") or [])]]
    # a profile that may run on AVX-512 (``isa_any``) gets 16: a multiple of 16 also fills AVX2
    return 16 if any(i.startswith("avx512") for i in isa) else 8


def prune_model(ctx: Context, cfg: PruneConfig) -> dict[str, Any]:
    """Prune ``ctx.model`` in place as ``cfg`` says; returns the fields of the stage's report row.

    Raises:
        CompressionError: a layer cannot be pruned, ``ignore`` names no layer, the target is
            out of reach.
    """
    import torch

    from edgesmith.compress.pruning.unstructured import compressed_size, prune_unstructured_
    from edgesmith.measure import count_macs

    seed = ctx.recipe.seed if cfg.seed is None else cfg.seed
    torch.manual_seed(seed)
    model = ctx.model
    if cfg.method == "unstructured":
        assert cfg.sparsity is not None
        before = compressed_size(model)
        zeros = prune_unstructured_(model, cfg.sparsity, scope=cfg.scope, ignore=cfg.ignore)
        if cfg.finetune_epochs > 0:
            log.warning("fine-tuning after unstructured pruning would refill the zeros; skipped")
        macs = count_macs(model, ctx.example_args)
        return {
            "method": "unstructured",
            "weight_sparsity": round(zeros, 4),
            "compressed_bytes_before": before,
            "compressed_bytes": compressed_size(model),
            "note": "dense kernels: zeros save neither time nor size unless the weights are stored compressed "
            f"(deflate: see compressed_bytes); MACs executed stay {macs}",
        }

    from edgesmith.compress.pruning.structured import StructuredPruner

    grad_batches = None
    if cfg.importance == "taylor":
        data = ctx.data.train

        def grad_batches() -> list[Any]:
            return _loader(
                data, cfg.batch_size, cfg.taylor_batches, seed, getattr(ctx.data, "collate", None)
            )

    round_to = simd_channels(ctx.profile) if cfg.round_to == "auto" else cfg.round_to
    pruner = StructuredPruner(
        model,
        ctx.example_input,
        importance=cfg.importance,
        scope=cfg.scope,
        round_to=round_to,
        ignore=cfg.ignore,
        keep_first=cfg.keep_first,
        max_layer_ratio=cfg.max_layer_ratio,
        resolution=cfg.resolution,
        grad_batches=grad_batches,
        grad_loss=_task_loss(ctx) if set(ctx.output_kinds) != {"logits"} else None,
    )
    base = pruner.base_macs
    params_before = sum(p.numel() for p in model.parameters())
    row: dict[str, Any] = {
        "method": "structured",
        "importance": cfg.importance,
        "scope": cfg.scope,
        "round_to": round_to,
        "kept_layers": pruner.ignored_names,
    }

    def recalibrate(step: int) -> None:
        from edgesmith.compress.train import recalibrate_batchnorm_

        row["bn_recalibrated"] = recalibrate_batchnorm_(
            model,
            ctx.data.train,
            cfg.batch_size,
            cfg.bn_batches,
            seed + step,
            torch.device("cpu"),
            getattr(ctx.data, "collate", None),
        )
        model.eval()

    if cfg.sparsity is not None:
        for i in range(1, cfg.steps + 1):
            target = int(base * (1 - cfg.sparsity * i / cfg.steps))
            pruner.prune_to_macs(target)
            recalibrate(i)
            if cfg.finetune_epochs > 0:
                _finetune(ctx, cfg, seed + i, f"prune step {i}/{cfg.steps}: fine-tune")
        row["target_sparsity"] = cfg.sparsity
    else:
        assert cfg.latency_ms is not None
        threads = ctx.profile.get("threads")
        latency = _onnx_latency_ms(model, ctx.example_args, threads, ctx.work_dir, cfg.device)
        row["latency_ms_before"] = round(latency, 4)
        step = 0
        while latency > cfg.latency_ms:
            step += 1
            target = int(pruner.macs - cfg.latency_step * base)
            try:
                pruner.prune_to_macs(max(target, 1))
            except Exception as exc:
                from edgesmith.errors import CompressionError

                if not isinstance(exc, CompressionError):
                    raise
                raise CompressionError(
                    f"latency budget {cfg.latency_ms} ms not reached: {latency:.3f} ms with "
                    f"{1 - pruner.macs / base:.1%} of the MACs removed ({exc.message})",
                    hint="raise latency_ms, or allow more pruning (max_layer_ratio, fewer ignored layers)",
                ) from None
            recalibrate(step)
            if cfg.finetune_epochs > 0:
                _finetune(ctx, cfg, seed + step, f"prune step {step}: fine-tune")
            latency = _onnx_latency_ms(model, ctx.example_args, threads, ctx.work_dir, cfg.device)
            log.info(
                "prune step %d: %.1f%% MACs removed, %.3f ms",
                step,
                100 * (1 - pruner.macs / base),
                latency,
            )
        row["latency_ms_target"] = cfg.latency_ms
        row["latency_ms_after"] = round(latency, 4)
        row["latency_threads"] = threads
    row["macs_before"] = base
    row["macs_reduction"] = round(1 - pruner.macs / base, 4)
    row["params_before"] = params_before
    row["params_after"] = sum(p.numel() for p in model.parameters())
    row["layers"] = pruner.changed_widths()
    return row


@register_stage
class Prune(Stage):
    """Structured or unstructured pruning (see :class:`PruneConfig`)."""

    name = "prune"
    config_cls = PruneConfig

    def run(self, ctx: Context) -> StageResult:
        cfg = self.config
        assert isinstance(cfg, PruneConfig)
        t0 = time.perf_counter()
        # the budget counts from the model as the recipe loaded it (edgesmith.checks)
        reference = ctx.evaluate(ctx.teacher) if cfg.max_accuracy_drop is not None else None
        row = prune_model(ctx, cfg)
        if cfg.method == "unstructured":
            ctx.artifact_hooks.append(_compressed_artifact_size)
        row["prune_seconds"] = round(time.perf_counter() - t0, 2)
        result = StageResult(row)
        if reference is not None and cfg.max_accuracy_drop is not None:
            acc = ctx.evaluate(ctx.model)
            row["accuracy_drop"] = round(reference - acc, 6)
            result.checks.append(accuracy_budget("prune", reference, acc, cfg.max_accuracy_drop))
        return result


def _compressed_artifact_size(ctx: Context, art: Any, ev: Any) -> HookResult:
    """Artifact hook: the deflate-compressed size of every exported file (unstructured zeros)."""
    from edgesmith.compress.pruning.unstructured import compressed_size

    if "compressed_bytes" not in art.extra:
        art.extra["compressed_bytes"] = sum(compressed_size(f) for f in art.files)
    return HookResult()
