"""The shared training loop of the pruning fine-tuning, distillation and QAT stages.

One loop for one process or many (torchrun + DistributedDataParallel, see ``distributed.py``):
progress bar with loss and accuracy, a checkpoint after every epoch (atomic, rank 0), resume from
it (also on another world size), early stopping on the evaluation metric with the best weights
restored, and determinism from a seed (each epoch reseeds shuffling and dropout).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgesmith.compress import distributed as dist_
from edgesmith.errors import CompressionError
from edgesmith.progress import echo, track

__all__ = [
    "CHECKPOINT_NAME",
    "FitConfig",
    "FitResult",
    "fit",
    "load_checkpoint",
    "recalibrate_batchnorm_",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
_KIND = "edgesmith-train-checkpoint"
_VERSION = 1

LossFn = Callable[[Any, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class FitConfig:
    """How to train.

    Attributes:
        epochs: passes over the training set; a fraction runs part of the last epoch.
        lr: peak learning rate (cosine decay to 0 over the whole run, or constant).
        batch_size: global batch size (split across torchrun processes).
        optimizer: ``adamw``, ``adam`` or ``sgd`` (momentum 0.9, Nesterov).
        weight_decay: decoupled for AdamW, L2 for the others.
        schedule: ``cosine`` or ``constant``.
        patience: stop after this many epochs without improving the metric by ``min_delta``.
        seed: shuffling and dropout seed.
        device: ``auto`` (this rank's GPU if any, else CPU), ``cpu`` or ``cuda``.
        max_steps_per_epoch: cap on optimizer steps per epoch (quick runs).
        bn_batches: after every epoch, BatchNorm running statistics are recomputed over this
            many training batches (0: keep the running averages). Networks built with a small
            BatchNorm momentum (EfficientNet: 0.01) otherwise evaluate with statistics of the
            weights from hundreds of steps ago.
        steps: total optimizer steps instead of ``epochs`` (whole epochs, then a partial one).
    """

    epochs: float = 1.0
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    patience: int | None = None
    min_delta: float = 0.0
    seed: int = 0
    device: str = "auto"
    max_steps_per_epoch: int | None = None
    bn_batches: int = 20
    steps: int | None = None


@dataclass
class FitResult:
    """What happened during :func:`fit`."""

    epochs_run: int
    best_epoch: int | None
    best_metric: float | None
    stopped_early: bool
    resumed_from: int | None
    world_size: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def _fingerprint(module: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _describe_mismatch(want: dict[str, list[int]], got: dict[str, list[int]]) -> str:
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    shapes = [f"{k} {got[k]} vs {want[k]}" for k in want if k in got and got[k] != want[k]]
    parts = []
    if shapes:
        parts.append("shapes differ: " + ", ".join(shapes[:3]))
    if missing:
        parts.append("it lacks " + ", ".join(missing[:3]))
    if extra:
        parts.append("it has extra " + ", ".join(extra[:3]))
    return "; ".join(parts)


# what fit() reads from a checkpoint
_CHECKPOINT_KEYS = frozenset(
    {"fingerprint", "model", "optimizer", "epoch", "best_metric", "best_epoch", "wait"}
    | {"best_model", "history", "world_size"}
)


def load_checkpoint(path: Path, module: nn.Module) -> dict[str, Any]:
    """Read a training checkpoint and check it belongs to ``module`` (nothing is changed).

    Raises:
        CompressionError: not a checkpoint, or written for another model.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CompressionError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            hint="delete it or point the checkpoint directory elsewhere",
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != _KIND:
        raise CompressionError(
            f"{path} is not an edgesmith training checkpoint",
            hint="point the checkpoint directory elsewhere",
        )
    missing = sorted(_CHECKPOINT_KEYS - set(ckpt))
    if missing:
        raise CompressionError(
            f"checkpoint {path} is incomplete (no {', '.join(missing)})",
            hint="delete it or point the checkpoint directory elsewhere",
        )
    want = _fingerprint(module)
    try:
        got = json.loads(ckpt["fingerprint"])
        json.loads(ckpt["history"])
        int(ckpt["epoch"]), int(ckpt["wait"]), int(ckpt["world_size"])
    except (TypeError, ValueError):
        raise CompressionError(
            f"checkpoint {path} is damaged (a field of the wrong type)",
            hint="delete it or point the checkpoint directory elsewhere",
        ) from None
    if got != want:
        raise CompressionError(
            f"checkpoint {path} was written for another model ({_describe_mismatch(want, got)})",
            hint="resume with the same student and teacher, or use another checkpoint directory; nothing was overwritten",
        )
    return ckpt


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_optimizer(params: list[nn.Parameter], cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer '{cfg.optimizer}'")


def to_device(x: Any, dev: torch.device) -> Any:
    """A batch's tensors on ``dev`` (a tensor, or a tuple/list/dict of them)."""
    if isinstance(x, torch.Tensor):
        return x.to(dev, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, dev) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(to_device(v, dev) for v in x)
    return x


def call(module: nn.Module, x: Any) -> Any:
    """``module`` on a batch of inputs: one tensor, or a tuple with one tensor per input."""
    return module(*x) if isinstance(x, tuple | list) else module(x)


def batch_size_of(x: Any) -> int:
    """Samples in a batch of inputs (or targets)."""
    while isinstance(x, tuple | list | dict):
        x = next(iter(x.values())) if isinstance(x, dict) else x[0]
    return len(x)


@torch.no_grad()
def recalibrate_batchnorm_(
    module: nn.Module,
    dataset: Any,
    batch_size: int,
    batches: int,
    seed: int,
    dev: torch.device,
    collate_fn: Any = None,
) -> bool:
    """Recompute every BatchNorm's running mean and variance over ``batches`` training batches.

    The same seeded batches on every rank, so distributed ranks agree without communication
    ("precise BN"). Returns False when the module has no BatchNorm.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches <= 0:
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was_training = module.training
    module.train()
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=torch.utils.data.RandomSampler(dataset, generator=g),
        collate_fn=collate_fn,
    )
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        call(module, to_device(x, dev))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    module.train(was_training)
    return True


def _epoch_steps(cfg: FitConfig, steps_per_epoch: int) -> list[int]:
    """Optimizer steps of each epoch (the last one partial for fractional ``epochs``)."""
    if cfg.steps is not None:
        whole, rest = divmod(cfg.steps, steps_per_epoch)
        return [steps_per_epoch] * whole + ([rest] if rest else [])
    full = int(cfg.epochs)
    steps = [steps_per_epoch] * full
    frac = cfg.epochs - full
    if frac > 1e-9:
        steps.append(max(1, math.ceil(frac * steps_per_epoch)))
    return steps


def fit(
    module: nn.Module,
    train_set: Any,
    loss_fn: LossFn,
    cfg: FitConfig,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    description: str = "train",
    collate_fn: Any = None,
) -> FitResult:
    """Train ``module`` in place on ``train_set`` (a Dataset of (input, target) pairs).

    Args:
        module: trained in place, returned to the CPU in eval mode.
        train_set: the training data.
        loss_fn: ``loss_fn(outputs, inputs, targets) -> (loss, logits)``; ``logits`` feed the
            running accuracy in the progress bar (None for models that are not classifiers).
        cfg: epochs, optimizer, batch size, early stopping, seed, device.
        evaluate: ``evaluate(model) -> metric`` (higher is better) after every epoch, on the CPU;
            with it the best epoch's weights are restored at the end.
        checkpoint_dir: where ``last.pt`` is written after every epoch (rank 0 only).
        resume: continue from ``checkpoint_dir/last.pt`` if it exists.
        description: the progress bar's label.
        collate_fn: batches samples (several inputs, or inputs of varying size:
            ``Datasets.collate``); default: torch's.

    Returns:
        A :class:`FitResult`.

    Raises:
        CompressionError: the checkpoint belongs to another model, or one exists and ``resume``
            is off (it is never overwritten silently).
    """
    t_start = time.perf_counter()
    dev = dist_.device(cfg.device)
    dist_.init_distributed(dev)
    rank, world = dist_.rank(), dist_.world_size()
    main = rank == 0
    ckpt_path = checkpoint_dir / CHECKPOINT_NAME if checkpoint_dir else None
    ckpt = None
    if ckpt_path is not None and ckpt_path.exists():
        if not resume:
            raise CompressionError(
                f"{ckpt_path} already exists",
                hint="pass --resume (or resume: true) to continue it, or use another checkpoint directory",
            )
        ckpt = load_checkpoint(ckpt_path, module)
    elif resume and ckpt_path is not None and main:
        echo(
            f"{description}: nothing to resume in {ckpt_path.parent} (no {ckpt_path.name}); starting at epoch 1"
        )
    module.to(dev)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = _make_optimizer(params, cfg)
    start_epoch, best, best_epoch, best_state, wait = 0, None, None, None, 0
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        module.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch = int(ckpt["epoch"])
        best, best_epoch, wait = ckpt["best_metric"], ckpt["best_epoch"], int(ckpt["wait"])
        best_state = ckpt["best_model"]
        history = json.loads(ckpt["history"])
        if main:
            echo(
                f"{description}: resumed from {ckpt_path} after epoch {start_epoch} "
                f"(written by {ckpt['world_size']} process(es), now {world})"
            )
    trainable = dist_.wrap(module, dev)
    sampler = dist_.ShardedBatchSampler(len(train_set), cfg.batch_size, cfg.seed, rank, world)
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, num_workers=0, collate_fn=collate_fn
    )
    steps_per_epoch = len(sampler)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise CompressionError(
            f"the training set has {len(train_set)} samples, fewer than one batch per process",
            hint="use more training data or a smaller batch size",
        )
    plan = _epoch_steps(cfg, steps_per_epoch)
    total_steps = sum(plan)
    global_step = sum(plan[:start_epoch])
    stopped = False
    for epoch in range(start_epoch, len(plan)):
        sampler.set_epoch(epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
        trainable.train()
        loss_sum, correct, seen, classified, t0 = 0.0, 0, 0, 0, time.perf_counter()
        stats: dict[str, object] = {}  # shown after the progress bar, updated every step
        batches = itertools.islice(loader, plan[epoch])
        if main:
            batches = track(
                batches, f"{description} epoch {epoch + 1}/{len(plan)}", plan[epoch], status=stats
            )
        for x, y in batches:
            if cfg.schedule == "cosine":
                lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * global_step / total_steps))
                for g in optimizer.param_groups:
                    g["lr"] = lr
            x, y = to_device(x, dev), to_device(y, dev)
            loss, logits = loss_fn(call(trainable, x), x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            global_step += 1
            n = batch_size_of(x)
            loss_sum += float(loss.detach()) * n
            if logits is not None and isinstance(y, torch.Tensor) and y.dim() == 1:
                correct += int((logits.detach().argmax(1) == y).sum())
                classified += n
            seen += n
            stats.update(loss=loss_sum / seen)
            if classified:
                stats.update(acc=correct / classified)
        recalibrate_batchnorm_(
            module,
            train_set,
            cfg.batch_size,
            cfg.bn_batches,
            cfg.seed * 7919 + epoch,
            dev,
            collate_fn,
        )
        dist_.sync_buffers(module)  # every rank evaluates (and decides) on the same weights
        module.eval()
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": round(loss_sum / max(seen, 1), 6),
            "train_accuracy": round(correct / classified, 6) if classified else None,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if evaluate is not None:
            metric = float(
                evaluate(module) if dev.type == "cpu" else evaluate(copy.deepcopy(module).cpu())
            )
            record["metric"] = round(metric, 6)
            if best is None or metric > best + cfg.min_delta:
                best, best_epoch, wait = metric, epoch + 1, 0
                best_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            else:
                wait += 1
                stopped = cfg.patience is not None and wait >= cfg.patience
        history.append(record)
        if main:
            metric_s = f", eval {record['metric']:.4f}" if "metric" in record else ""
            echo(
                f"{description} epoch {epoch + 1}/{len(plan)}: loss {record['loss']:.4f}"
                + (
                    f", train acc {record['train_accuracy']:.4f}"
                    if record["train_accuracy"] is not None
                    else ""
                )
                + f"{metric_s} ({record['seconds']:.0f} s)"
            )
        if ckpt_path is not None and main:
            _save_checkpoint(
                ckpt_path,
                {
                    "kind": _KIND,
                    "version": _VERSION,
                    "fingerprint": json.dumps(_fingerprint(module)),
                    "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "best_metric": best,
                    "best_epoch": best_epoch,
                    "best_model": best_state,
                    "wait": wait,
                    "history": json.dumps(history),
                    "world_size": world,
                    "config": json.dumps(asdict(cfg)),
                },
            )
        dist_.barrier()
        if stopped:
            if main:
                echo(
                    f"{description}: early stop after epoch {epoch + 1}: no gain of more than "
                    f"{cfg.min_delta} for {cfg.patience} epoch(s); best epoch {best_epoch}"
                )
            break
    if evaluate is not None and best_state is not None:
        module.load_state_dict(best_state)
    module.to("cpu").eval()
    if main:
        sys.stderr.flush()
    return FitResult(
        epochs_run=len(history),
        best_epoch=best_epoch,
        best_metric=best,
        stopped_early=stopped,
        resumed_from=start_epoch if ckpt is not None else None,
        world_size=world,
        seconds=time.perf_counter() - t_start,
        history=history,
    )
