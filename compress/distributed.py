"""torchrun / DistributedDataParallel helpers: the same command runs on one or many processes.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) training stages start a process group
(``gloo`` on CPU, ``nccl`` when every rank has a CUDA device), wrap the model in
DistributedDataParallel and split each global batch across ranks; only rank 0 writes files. The
batch split is chosen so that a step sees exactly the samples of the single-process step
(:class:`ShardedBatchSampler`), which is what makes checkpoints resume on another world size.

Example:
    torchrun --nproc-per-node 2 -m edgesmith distill recipe.yaml --student pruned.safetensors -o out.safetensors
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "ShardedBatchSampler",
    "barrier",
    "broadcast_object",
    "device",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "rank",
    "sync_buffers",
    "unwrap",
    "world_size",
    "wrap",
]


def world_size() -> int:
    """Processes in the job (1 when not launched by torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 when not launched by torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    """True on rank 0, the only rank that writes output files and prints progress."""
    return rank() == 0


def device(preference: str = "auto") -> torch.device:
    """The device training runs on: this rank's GPU if there is one (``auto``), else the CPU."""
    import torch

    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from edgesmith.errors import EdgesmithError

        raise EdgesmithError(
            "device 'cuda' was asked for but no CUDA device is visible",
            hint="use device: auto or cpu",
        )
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def init_distributed(dev: torch.device | None = None) -> bool:
    """Start the process group once if launched by torchrun; True when running distributed.

    The backend is ``nccl`` when training on CUDA, ``gloo`` otherwise.
    """
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dev = dev or device()
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        timeout = datetime.timedelta(seconds=int(os.environ.get("EDGESMITH_DIST_TIMEOUT", "1800")))
        dist.init_process_group(backend=backend, timeout=timeout)
        atexit.register(_shutdown)
    return True


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, dev: torch.device) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when distributed, else unchanged."""
    if not is_distributed():
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # buffers (BatchNorm statistics) follow rank 0 at every forward, so the ranks end identical
    sync = (
        {"forward_sync_buffers": True}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": True}
    )
    return DistributedDataParallel(
        module, device_ids=[dev.index] if dev.type == "cuda" else None, **sync
    )


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper."""
    return getattr(module, "module", module)


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sync_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank.

    DDP syncs buffers before each forward, so after the last training step every rank still
    holds its own statistics; call this before evaluating or saving so all ranks agree.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (unchanged when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ShardedBatchSampler:
    """Batches of indices such that the union over ranks of step ``s`` is the single-process batch.

    Each epoch shuffles with ``seed + epoch`` and cuts the permutation into global batches of
    ``batch_size`` (a last partial batch is dropped); rank ``r`` of ``w`` takes every ``w``-th
    index of a global batch starting at ``r``. The sequence of global batches does not depend on
    the world size, so a run can resume on a different number of processes.

    Args:
        n: dataset size.
        batch_size: global batch size (divisible by the world size).
        seed: shuffling seed.
        rank / world: this process and the number of processes.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if batch_size % world:
            from edgesmith.errors import EdgesmithError

            raise EdgesmithError(
                f"batch size {batch_size} cannot be split over {world} processes",
                hint=f"use a batch size divisible by {world}",
            )
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0
        self.global_batch = min(batch_size, n - n % world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.global_batch if self.global_batch else 0

    def __iter__(self) -> Iterator[list[int]]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        b = self.global_batch
        for step in range(len(self)):
            yield perm[step * b + self.rank : (step + 1) * b : self.world].tolist()
