"""Fixtures for the compression tests: real Fashion-MNIST subsets and the trained reference models."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import FMNIST_DIR

EXAMPLE = torch.zeros(1, 1, 28, 28)


def _example_module() -> Any:
    spec = importlib.util.spec_from_file_location("fmnist_models", FMNIST_DIR / "model.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MODELS = _example_module()


def trained(name: str, **kwargs: Any) -> torch.nn.Module:
    """A reference model with its committed weights (SmallCNN, RowLSTM, PatchTransformer)."""
    from edgesmith.models import load_state_dict, load_weights_

    files = {
        "SmallCNN": "weights.safetensors",
        "RowLSTM": "lstm.safetensors",
        "PatchTransformer": "transformer.safetensors",
    }
    model = getattr(MODELS, name)(**kwargs)
    load_weights_(model, load_state_dict(FMNIST_DIR / files[name]))
    return model.eval()


@pytest.fixture(scope="session")
def fmnist() -> Any:
    """Real Fashion-MNIST: 1,024 training images, 64 calibration, the first 500 test images."""
    from edgesmith.data import load_datasets
    from edgesmith.recipe import DataConfig

    return load_datasets(
        DataConfig(kind="fashion-mnist", train=1024, calibration=64, eval=500), [1, 1, 28, 28]
    )


def accuracy(model: torch.nn.Module, dataset: Any) -> float:
    from edgesmith.measure import torch_outputs
    from edgesmith.metrics import get_metric

    return float(get_metric("top1")(*torch_outputs(model, dataset)))


@pytest.fixture(scope="session")
def _pruned_cnn_once() -> torch.nn.Module:
    from edgesmith.compress.pruning.structured import StructuredPruner

    model = trained("SmallCNN")
    pruner = StructuredPruner(model, EXAMPLE, importance="l2", round_to=8)
    pruner.prune_to_macs(pruner.base_macs // 2)
    return model


@pytest.fixture
def pruned_cnn(_pruned_cnn_once: torch.nn.Module) -> torch.nn.Module:
    """SmallCNN with half its MACs removed (l2, per layer, multiples of 8), not fine-tuned."""
    return copy.deepcopy(_pruned_cnn_once)


@pytest.fixture
def cnn_recipe(tmp_path: Path) -> Path:
    """A recipe folder for CLI tests: the reference model with small data splits."""
    import shutil

    for name in ("model.py", "weights.safetensors"):
        shutil.copy(FMNIST_DIR / name, tmp_path / name)
    (tmp_path / "recipe.yaml").write_text(
        """\
version: 1
name: t
model:
  factory: model.py:SmallCNN
  weights: weights.safetensors
  input: {shape: [1, 1, 28, 28], dtype: float32}
data: {kind: fashion-mnist, calibration: 64, eval: 300, train: 512}
target: x86-cpu
stages:
  - prune: {sparsity: 0.5}
  - distill: {epochs: 1, temperature: 4.0, alpha: 0.7}
export: [onnx]
"""
    )
    return tmp_path / "recipe.yaml"


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``edgesmith ARGS`` through the console entry point (exit codes, error lines)."""
    from edgesmith.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err
