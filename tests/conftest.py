"""Shared fixtures: the reference recipe and one reference build per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FMNIST_DIR = ROOT / "examples" / "fashion_mnist"
FMNIST_RECIPE = FMNIST_DIR / "recipe-fp32.yaml"


SLOW_TIMEOUT = 1800  # seconds; the default suite's per-test limit is `timeout` in pyproject.toml


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests (EfficientNet, full training) get a longer per-test limit unless they set one."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def fmnist_recipe() -> Path:
    return FMNIST_RECIPE


@pytest.fixture(scope="session")
def reference_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference recipe built once (about 15 s): report, ONNX artifact and bundle."""
    from edgesmith.pipeline import build
    from edgesmith.recipe import load_recipe

    out = tmp_path_factory.mktemp("reference") / "out"
    build(load_recipe(FMNIST_RECIPE), out, bundle_version=1)
    return out


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Path:
    """A folder holding copies of the reference model code and weights, for recipes written by tests."""
    for name in ("model.py", "weights.safetensors"):
        shutil.copy(FMNIST_DIR / name, tmp_path / name)
    return tmp_path


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


BASE_RECIPE = """\
version: 1
name: t
model:
  factory: model.py:SmallCNN
  weights: weights.safetensors
  input: {shape: [1, 1, 28, 28], dtype: float32}
data:
  kind: fashion-mnist
  calibration: 64
  eval: 500
target: x86-cpu
export: [onnx]
"""


@pytest.fixture(scope="session")
def head_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SmallCNN built with ``trainable_head: {module: classifier.4}`` once (about 10 s):
    an ONNX backbone (64 features) plus a linear head in head.npz, unsigned, version 1."""
    from tests.finetune_helpers import build_head_bundle

    return build_head_bundle(tmp_path_factory.mktemp("head") / "out")


@pytest.fixture(scope="session")
def mlp_head_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SmallCNN built with ``trainable_head: {module: classifier}`` once (about 10 s): an
    ONNX backbone (3,136 features), the two-layer MLP head, and its memory of the 10 classes."""
    from tests.finetune_helpers import build_head_bundle

    return build_head_bundle(tmp_path_factory.mktemp("mlp-head") / "out", module="classifier")
