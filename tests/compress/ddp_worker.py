"""Helper for test_distributed.py, run as ``python -m tests.compress.ddp_worker OUT PRUNED [EPOCHS]``
(alone or under torchrun): distils the pruned SmallCNN on 512 real Fashion-MNIST images, then
every rank writes its final weights to ``OUT/rank{r}-of-{w}.safetensors`` and rank 0 the
accuracy on 500 test images to ``OUT/metrics-{w}.json``. Checkpoints go to ``OUT/ckpt``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch


def run(out: Path, pruned: Path, epochs: float = 1, resume: bool = False) -> dict[str, Any]:
    from safetensors.torch import save_file

    from edgesmith.compress import distributed
    from edgesmith.compress.distill import DistillConfig, distill
    from edgesmith.data import load_datasets
    from edgesmith.models import build_model
    from edgesmith.recipe import DataConfig, InputSpec, ModelConfig
    from tests.compress.conftest import EXAMPLE, accuracy
    from tests.conftest import FMNIST_DIR

    data = load_datasets(
        DataConfig(kind="fashion-mnist", train=512, calibration=64, eval=500), [1, 1, 28, 28]
    )

    def model(weights: Path) -> torch.nn.Module:
        spec = ModelConfig(
            factory=f"{FMNIST_DIR / 'model.py'}:SmallCNN",
            weights=str(weights),
            input=InputSpec(shape=[1, 1, 28, 28]),
        )
        return build_model(spec)

    student, teacher = model(pruned), model(FMNIST_DIR / "weights.safetensors")
    cfg = DistillConfig(epochs=epochs, lr=2e-3, batch_size=64, device="cpu")
    result = distill(
        student,
        teacher,
        data.train,
        cfg,
        EXAMPLE,
        checkpoint_dir=out / "ckpt",
        resume=resume,
        seed=0,
    )
    r, w = distributed.rank(), distributed.world_size()
    save_file(
        {k: v.contiguous() for k, v in student.state_dict().items()},
        str(out / f"rank{r}-of-{w}.safetensors"),
    )
    metrics = {
        "accuracy": accuracy(student, data.eval),
        "world_size": w,
        "resumed_from": result.resumed_from,
        "epochs_run": result.epochs_run,
    }
    if r == 0:
        (out / f"metrics-{w}.json").write_text(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 1)
