"""The reference: pretrained EfficientNet-Lite0 built with a trainable head, fine-tuned on real
Fashion-MNIST on the "device" (slow: a few minutes on 2 cores; `pytest -m slow`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.finetune_helpers import REPO, fmnist

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def effnet_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("efficientnet_lite_pytorch")
    from edgesmith.pipeline import build
    from edgesmith.recipe import load_recipe

    recipe = load_recipe(REPO / "examples/efficientnet_lite0/recipe-finetune.yaml")
    recipe.data.eval = 500
    out = tmp_path_factory.mktemp("effnet") / "out"
    report = build(recipe, out, bundle_version=1)
    art = report["artifacts"][0]
    assert art["parity"]["top1_agreement"] >= 0.999  # head(backbone(x)) vs the PyTorch model
    return out / art["bundle"]


def test_effnet_backbone_bundle_finetunes_on_the_device(
    effnet_bundle: Path, tmp_path: Path
) -> None:
    from edgesmith.devices.ota import check_health
    from edgesmith.runtime import load

    model = load(effnet_bundle)
    spec = model.manifest.trainable_head
    assert spec["feature_size"] == 1280 and spec["kind"] == "linear"
    x, y = fmnist("train")
    xt, yt = fmnist("test")
    pick = np.random.default_rng(0).permutation(len(x))[-600:]  # not in the shipped head's data
    before = float((model(xt[:500]).argmax(1) == yt[:500]).mean())
    result = model.finetune(x[pick], y[pick], epochs=20, out=tmp_path / "v2")
    new = load(result.bundle)
    after = float((new(xt[:500]).argmax(1) == yt[:500]).mean())
    assert before > 0.78 and after > before - 0.03  # 600 images keep a 12k-image head's level
    assert check_health(result.bundle).ok
    doc = json.loads((result.bundle / "manifest.json").read_text())
    trained = doc["trainable_head"]["trained"]
    assert doc["version"] == 2 and trained["samples"] + trained["holdout_samples"] == 600
    assert abs(trained["holdout_samples"] - 120) <= 5
