"""torchrun + DistributedDataParallel on CPU (gloo): identical ranks, single-process accuracy,
and checkpoints that resume on another world size."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from edgesmith.compress.distributed import ShardedBatchSampler
from tests.conftest import ROOT


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_split_exactly_the_single_process_batches(world: int) -> None:
    single = list(ShardedBatchSampler(1000, 64, seed=7))
    shards = [ShardedBatchSampler(1000, 64, seed=7, rank=r, world=world) for r in range(world)]
    for s in shards:
        s.set_epoch(0)
    per_rank = [list(s) for s in shards]
    assert all(len(b) == len(single) == 1000 // 64 for b in per_rank)
    for step, batch in enumerate(single):
        union = sorted(i for r in range(world) for i in per_rank[r][step])
        assert union == sorted(batch) and all(
            len(per_rank[r][step]) == 64 // world for r in range(world)
        )
    nxt = ShardedBatchSampler(1000, 64, seed=7)
    nxt.set_epoch(1)
    assert list(nxt) != single  # reshuffled every epoch


def test_batch_not_divisible_by_world_size_is_an_error() -> None:
    from edgesmith.errors import EdgesmithError

    with pytest.raises(EdgesmithError, match="cannot be split over 3 processes"):
        ShardedBatchSampler(100, 64, seed=0, rank=0, world=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_cpu_processes_match_one(pruned_cnn: nn.Module, tmp_path: Path) -> None:
    from edgesmith.compress.pruning.structure import save_model
    from tests.compress import ddp_worker

    pruned = save_model(pruned_cnn, tmp_path / "pruned.safetensors")
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    ddp_out.mkdir()
    single_out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "tests.compress.ddp_worker",
        str(ddp_out),
        str(pruned),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the ranks end with identical weights (parameters and BatchNorm statistics)
    r0, r1 = (load_file(str(ddp_out / f"rank{r}-of-2.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # and score like the same training in one process (same global batches; BatchNorm batch
    # statistics and dropout masks differ per rank, so not bit for bit)
    torch.set_num_threads(1)
    single = ddp_worker.run(single_out, pruned)
    ddp = json.loads((ddp_out / "metrics-2.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert abs(ddp["accuracy"] - single["accuracy"]) <= 0.02, (ddp, single)
    assert ddp["accuracy"] > 0.8
    # the 2-process checkpoint resumes in one process
    resumed = ddp_worker.run(ddp_out, pruned, epochs=2, resume=True)
    assert resumed["resumed_from"] == 1 and resumed["epochs_run"] == 2
    assert resumed["accuracy"] > 0.8


@pytest.mark.slow
def test_build_under_torchrun_writes_once(cnn_recipe: Path) -> None:
    """`torchrun -m edgesmith build`: both ranks prune and distil, rank 0 alone writes the output."""
    text = (
        cnn_recipe.read_text().replace("train: 512", "train: 256").replace("eval: 300", "eval: 200")
    )
    cnn_recipe.write_text(text)
    out = cnn_recipe.parent / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "edgesmith",
        "build",
        str(cnn_recipe),
        "-o",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    prune, dist = report["stages"]
    assert prune["macs"] <= 0.5 * report["baseline"]["macs"]
    assert dist["world_size"] == 2 and dist["epochs_run"] == 1
    assert proc.stdout.count("wrote ") + proc.stderr.count("wrote ") == 1
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out")]  # no leftovers
