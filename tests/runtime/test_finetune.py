"""Trainable-head bundles and on-device fine-tuning in numpy, against PyTorch on real Fashion-MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgesmith.errors import BundleError, DataError, RecipeError
from edgesmith.runtime import load
from edgesmith.runtime.finetune import FeatureCache, encode_labels
from edgesmith.runtime.finetune.head import Head, LayerSpec, load_head
from edgesmith.runtime.finetune.training import (
    FinetuneConfig,
    balanced_weights,
    cross_entropy,
    evaluate_head,
    init_like,
    stratified_split,
    train_head,
)
from tests.finetune_helpers import REPO, fmnist, restrict_classes

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def smallcnn():
    from edgesmith.models import build_model
    from edgesmith.recipe import load_recipe

    return build_model(load_recipe(REPO / "examples/fashion_mnist/recipe-fp32.yaml").model).eval()


@pytest.fixture(scope="module")
def feats(head_bundle: Path) -> dict[str, np.ndarray]:
    """Backbone features of 1,500 real training and 1,000 test images (computed once)."""
    model = load(head_bundle)
    xtr, ytr = fmnist("train")
    xte, yte = fmnist("test")
    return {
        "x": model.features(xtr[:1500]),
        "y": ytr[:1500],
        "xt": model.features(xte[:1000]),
        "yt": yte[:1000],
    }


def _torch_input(images: np.ndarray) -> torch.Tensor:
    from edgesmith.data import FASHION_MNIST_PREPROCESS, _as_model_input

    return torch.from_numpy(
        _as_model_input(images, FASHION_MNIST_PREPROCESS, [1, 1, 28, 28], "float32")
    )


# --------------------------------------------------------------------------- bundles


def test_head_bundle_gives_the_torch_logits_and_features(head_bundle: Path, smallcnn) -> None:
    model = load(head_bundle)
    spec = model.manifest.trainable_head
    assert spec["kind"] == "linear" and spec["feature_size"] == 64 and spec["classes"] == 10
    assert spec["trained"]["by"] == "build" and spec["policy"] == "keep"
    assert "head.npz" in model.manifest.files
    assert model.outputs[0].shape == ("batch", 10) and model.info["head"]["classes"] == 10
    x, _ = fmnist("test")
    with torch.inference_mode():
        t_in = _torch_input(x[:256])
        want = smallcnn(t_in).numpy()
        want_feats = smallcnn.classifier[:4](smallcnn.features(t_in)).numpy()
    np.testing.assert_allclose(model(x[:256]), want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(model.features(x[:256]), want_feats, atol=1e-4, rtol=1e-4)
    # the build measured head(backbone(x)) against PyTorch: full agreement, same accuracy
    report = json.loads((head_bundle.parents[1] / "report.json").read_text())
    art = report["artifacts"][0]
    assert art["parity"]["top1_agreement"] == 1.0
    assert abs(art["accuracy"] - report["baseline"]["accuracy"]) < 1e-9
    assert art["accuracy"] > 0.9


def test_health_check_passes_on_the_head_logits(head_bundle: Path) -> None:
    from edgesmith.devices.ota import check_health

    report = check_health(head_bundle)
    assert report.ok and report.golden and report.top1_agreement == 1.0


def test_split_head_mlp_matches_the_model_and_refuses_what_a_device_cannot_run(smallcnn) -> None:
    from edgesmith.heads import split_head

    example = _torch_input(fmnist("test")[0][:4])
    split = split_head(smallcnn, "classifier", example)
    assert [layer.type for layer in split.head.layers] == ["linear", "relu", "dropout", "linear"]
    assert split.head.feature_size == 64 * 7 * 7
    with torch.inference_mode():
        np.testing.assert_allclose(
            split.head(split.backbone(example).numpy()), smallcnn(example).numpy(), atol=1e-4
        )
    with pytest.raises(RecipeError, match="no submodule 'classifer'"):
        split_head(smallcnn, "classifer", example)
    with pytest.raises(RecipeError, match="contains a Conv2d"):
        split_head(smallcnn, "features", example)
    with pytest.raises(RecipeError, match="does not run with 'classifier.1' removed"):
        split_head(smallcnn, "classifier.1", example)  # not the last step of forward()
    smallcnn_tail = torch.nn.Sequential(smallcnn, torch.nn.Softmax(dim=1)).eval()
    with pytest.raises(RecipeError, match="differs from model"):
        split_head(smallcnn_tail, "0.classifier", example)  # a softmax follows the head


def test_recipe_trainable_head_keys_are_checked(tmp_path: Path) -> None:
    from edgesmith.recipe import load_recipe
    from tests.finetune_helpers import HEAD_RECIPE

    ok = tmp_path / "ok.yaml"
    ok.write_text(HEAD_RECIPE)
    assert load_recipe(ok).trainable_head.module == "classifier.4"
    bad = tmp_path / "bad.yaml"
    bad.write_text(HEAD_RECIPE.replace("policy: keep", "policy: merge"))
    with pytest.raises(RecipeError, match="trainable_head.policy"):
        load_recipe(bad)
    bad.write_text(HEAD_RECIPE.replace("policy: keep", "polcy: keep"))
    with pytest.raises(RecipeError, match="unknown key 'trainable_head.polcy'"):
        load_recipe(bad)


def test_manifest_head_schema_is_checked(head_bundle: Path) -> None:
    from edgesmith.runtime.bundle import Manifest

    doc = json.loads((head_bundle / "manifest.json").read_text())
    doc["trainable_head"]["classes"] = 11
    with pytest.raises(ValueError, match="gives 10 outputs but 'classes' is 11"):
        Manifest.model_validate(doc)


# --------------------------------------------------------------------------- numerics vs PyTorch


def test_mlp_gradients_equal_torch_autograd(smallcnn) -> None:
    from edgesmith.heads import split_head

    x, y = fmnist("train")
    example = _torch_input(x[:64])
    split = split_head(smallcnn, "classifier", example)
    with torch.inference_mode():
        f = split.backbone(example).reshape(64, -1).numpy()
    head, yy = split.head, y[:64]
    w = balanced_weights(yy, 10)
    logits, cache = head.forward(f, train=True, rng=np.random.default_rng(0))
    loss, grad = cross_entropy(logits, yy, w)
    grads = head.backward(cache, grad)
    mask = torch.from_numpy(cache[2])  # the dropout mask numpy drew
    t = {k: torch.tensor(v, requires_grad=True) for k, v in head.params.items()}
    h = torch.relu(torch.from_numpy(f) @ t["layers.0.weight"].T + t["layers.0.bias"]) * mask
    out = h @ t["layers.3.weight"].T + t["layers.3.bias"]
    t_loss = torch.nn.functional.cross_entropy(
        out, torch.from_numpy(yy), weight=torch.from_numpy(w)
    )
    t_loss.backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-5)
    for k, tv in t.items():
        np.testing.assert_allclose(grads[k], tv.grad.numpy(), rtol=1e-4, atol=1e-6)
    # label smoothing, unweighted: the same loss as PyTorch's
    sm, _ = cross_entropy(logits, yy, None, 0.1)
    assert sm == pytest.approx(
        torch.nn.functional.cross_entropy(
            torch.from_numpy(logits), torch.from_numpy(yy), label_smoothing=0.1
        ).item(),
        rel=1e-5,
    )


def test_distillation_loss_and_gradient_equal_torch(feats: dict) -> None:
    from edgesmith.runtime.finetune.training import _distillation

    rng = np.random.default_rng(0)
    logits = (feats["x"][:32] @ rng.normal(0, 0.3, (64, 10))).astype(np.float32)
    teacher = (feats["x"][:32] @ rng.normal(0, 0.3, (64, 7))).astype(np.float32)
    loss, grad = _distillation(logits, teacher, 2.0)
    t = torch.tensor(logits, requires_grad=True)
    t_loss = (
        torch.nn.functional.kl_div(
            torch.log_softmax(t[:, :7] / 2.0, 1),
            torch.softmax(torch.from_numpy(teacher) / 2.0, 1),
            reduction="batchmean",
        )
        * 4.0
    )
    t_loss.backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-5)
    np.testing.assert_allclose(grad, t.grad.numpy()[:, :7], rtol=1e-4, atol=1e-7)
    assert np.all(t.grad.numpy()[:, 7:] == 0)  # new classes are not distilled


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_follows_torch_step_for_step(feats: dict, optimizer: str) -> None:
    """Same initial head, same batches, same optimiser settings: the same weights after 3 epochs."""
    x, y = feats["x"][:1000], feats["y"][:1000]
    rng = np.random.default_rng(1)
    start = Head.from_arrays(
        [LayerSpec(type="linear", in_features=64, out_features=10)],
        {
            "layers.0.weight": rng.normal(0, 0.1, (10, 64)),
            "layers.0.bias": np.zeros(10),
        },
    )
    cfg = FinetuneConfig(
        epochs=3,
        batch_size=64,
        optimizer=optimizer,
        lr=1e-3 if optimizer == "adam" else 1e-2,
        weight_decay=1e-3,
        balance=False,
        patience=None,
        normalize=False,
    )
    trained = train_head(start, x, y, cfg).head
    lin = torch.nn.Linear(64, 10)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(start.params["layers.0.weight"]))
        lin.bias.copy_(torch.from_numpy(start.params["layers.0.bias"]))
    groups = [
        {"params": [lin.weight], "weight_decay": 1e-3},
        {"params": [lin.bias], "weight_decay": 0},
    ]
    opt = (
        torch.optim.Adam(groups, lr=1e-3)
        if optimizer == "adam"
        else torch.optim.SGD(groups, lr=1e-2, momentum=0.9)
    )
    perm_rng = np.random.default_rng(cfg.seed)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(3):
        perm = perm_rng.permutation(len(x))
        for s in range(0, len(x), 64):
            idx = torch.from_numpy(perm[s : s + 64])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(tx[idx]), ty[idx]).backward()
            opt.step()
    np.testing.assert_allclose(
        trained.params["layers.0.weight"], lin.weight.detach().numpy(), atol=2e-5
    )
    np.testing.assert_allclose(
        trained.params["layers.0.bias"], lin.bias.detach().numpy(), atol=2e-5
    )
    # and the training moved the weights (not a vacuous comparison)
    assert np.abs(trained.params["layers.0.weight"] - start.params["layers.0.weight"]).max() > 1e-3


# --------------------------------------------------------------------------- fine-tuning a bundle


def test_finetune_learns_new_classes_and_writes_the_next_version(
    head_bundle: Path, tmp_path: Path
) -> None:
    """A head that knows 8 classes learns Bag and Ankle boot from 1,000 real images."""
    from edgesmith.devices.ota import check_health

    b8 = restrict_classes(head_bundle, tmp_path / "b8", 8)
    model = load(b8)
    x, y = fmnist("train")
    labels = list(load(head_bundle).labels)
    names = [labels[i] for i in y[:1000]]
    result = model.finetune(x[:1000], names, add_classes=True, epochs=40, out=tmp_path / "v2")
    m = result.metrics
    assert result.labels == [*labels[:8], "Ankle boot", "Bag"]
    assert m["before"]["new_classes"] == 0.0 and m["after"]["new_classes"] > 0.85
    assert m["after"]["old_classes"] > m["before"]["old_classes"] - 0.03
    assert result.improved and m["holdout_accuracy"] > m["previous_holdout_accuracy"] + 0.1
    new = load(result.bundle)
    assert new.version == 2 and new.labels == result.labels and new.outputs[0].shape[1] == 10
    trained = new.manifest.trainable_head["trained"]
    assert trained["by"] == "device" and trained["parent_version"] == 1
    assert trained["base_version"] == 1 and trained["added_classes"] == ["Ankle boot", "Bag"]
    assert new.manifest.files[new.manifest.model] == model.manifest.files[model.manifest.model]
    assert check_health(result.bundle).ok  # golden outputs regenerated for the new head
    xt, yt = fmnist("test")
    pred = new(xt[:500]).argmax(1)
    got = [new.labels[i] for i in pred]
    want = [labels[i] for i in yt[:500]]
    assert np.mean([a == b for a, b in zip(got, want, strict=True)]) > 0.85
    assert model.labels == labels[:8]  # the loaded model itself is unchanged


def test_labels_outside_the_known_set_are_refused(head_bundle: Path) -> None:
    labels = load(head_bundle).labels
    with pytest.raises(DataError, match="labels outside the model's classes: Hat") as e:
        encode_labels(["Bag", "Hat"], labels)
    assert "--add-classes" in e.value.hint
    idx, grown = encode_labels(["bag", "ankle-boot", "Hat"], labels, add_classes=True)
    assert idx.tolist() == [8, 9, 10] and grown[-1] == "Hat"  # slugs match folder names
    with pytest.raises(DataError, match=r"label indices must lie in \[0, 10\)"):
        encode_labels(np.array([3, 10]), labels)


def test_a_bundle_without_trainable_head_is_refused(reference_build: Path) -> None:
    report = json.loads((reference_build / "report.json").read_text())
    model = load(reference_build / report["artifacts"][0]["bundle"])
    x, y = fmnist("train")
    with pytest.raises(BundleError, match="has no trainable head") as e:
        model.finetune(x[:10], y[:10])
    assert "trainable_head" in e.value.hint
    with pytest.raises(BundleError, match="has no trainable head"):
        model.features(x[:2])


def test_the_backbone_runs_once_per_sample(head_bundle: Path, tmp_path: Path) -> None:
    model = load(head_bundle)
    x, _ = fmnist("train")
    cache = FeatureCache(tmp_path / "cache")
    first = cache.features(model, x[:300])
    again = cache.features(model, np.concatenate([x[100:200], x[:50]]))
    assert (cache.misses, cache.hits) == (300, 150)
    np.testing.assert_array_equal(again[:100], first[100:200])
    cache.save()
    fresh = FeatureCache(tmp_path / "cache")  # a later run on the device
    np.testing.assert_array_equal(fresh.features(model, x[:300]), first)
    assert fresh.misses == 0 and fresh.hits == 300
    dup = FeatureCache().features(model, np.stack([x[0], x[0], x[1]]))
    np.testing.assert_array_equal(dup[0], dup[1])


def test_balanced_weights_and_early_stopping(feats: dict) -> None:
    np.testing.assert_allclose(balanced_weights(np.array([0, 0, 0, 1]), 3), [2 / 3, 2, 0])
    tr, va = stratified_split(feats["y"], 0.2)
    assert len(set(tr) & set(va)) == 0 and abs(len(va) - 300) <= 10
    assert set(feats["y"][va]) == set(range(10))
    # 30 training samples, a large learning rate and no L2: the held-out loss soon rises
    small = tr[:30]
    shipped = load_head(*_head_args(feats))
    start = init_like(shipped, np.random.default_rng(0))
    cfg = FinetuneConfig(epochs=300, lr=0.05, weight_decay=0, patience=3)
    val = (feats["x"][va], feats["y"][va])
    res = train_head(start, feats["x"][small], feats["y"][small], cfg, val=val)
    assert res.stopped_early and len(res.history) < 300 and res.best_epoch >= 1
    best = min(h["val_loss"] for h in res.history)
    assert res.history[res.best_epoch - 1]["val_loss"] == best
    got = evaluate_head(res.head, *val)["loss"]
    assert got == pytest.approx(best, rel=1e-4)  # the best epoch's weights were restored
    # shuffled labels only hurt a good head: it comes back unchanged (epoch 0 was the best)
    noisy = np.random.default_rng(0).permutation(feats["y"][tr])
    res = train_head(shipped, feats["x"][tr], noisy, cfg, val=val)
    assert res.best_epoch == 0 and res.stopped_early
    for k, v in shipped.params.items():
        np.testing.assert_array_equal(res.head.params[k], v)


def _head_args(feats: dict) -> tuple:
    return _HEAD_ARGS[0]


_HEAD_ARGS: list[tuple] = []


@pytest.fixture(autouse=True, scope="module")
def _head_of_bundle(head_bundle: Path) -> None:
    m = load(head_bundle).manifest
    _HEAD_ARGS[:] = [(head_bundle, m.trainable_head)]


# --------------------------------------------------------------------------- incremental learning


def test_replay_buffer_is_bounded_balanced_and_persistent(tmp_path: Path, feats: dict) -> None:
    from edgesmith.runtime.finetune.incremental import ReplayBuffer

    labels = [str(i) for i in range(10)]
    buf = ReplayBuffer(capacity=50, seed=0)
    buf.add(feats["x"][:1000], feats["y"][:1000], "bb1", labels)
    assert len(buf) == 50 and set(buf.counts().values()) == {5}
    x, y = buf.arrays("bb1", labels)
    assert x.shape == (50, 64) and np.bincount(y).tolist() == [5] * 10
    buf.save(tmp_path / "replay.npz")
    assert (tmp_path / "replay.npz").stat().st_mode & 0o077 == 0  # local data: owner only
    back = ReplayBuffer.load(tmp_path / "replay.npz")
    x2, y2 = back.arrays("bb1", labels)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_allclose(x2, x, atol=1e-2 * np.abs(x).max())  # stored as float16
    back.add(feats["x"][:10], feats["y"][:10], "bb2", labels)  # a new backbone: old rows dropped
    assert len(back) == 10
    with pytest.raises(DataError, match="classes do not match"):
        back.add(feats["x"][:1], feats["y"][:1], "bb2", ["x", *labels[1:]])


def test_incremental_batches_with_replay_keep_the_first_classes(
    feats: dict, head_bundle: Path, tmp_path: Path
) -> None:
    """Classes 0-4 first, then five batches that each bring one new class (real images):
    with a replay buffer the first classes keep their accuracy; without one they are forgotten."""
    from edgesmith.runtime.finetune.incremental import IncrementalLearner

    b5 = restrict_classes(head_bundle, tmp_path / "b5", 5)
    head5, labels = load(b5).head, load(head_bundle).labels
    x, y, xt, yt = feats["x"], feats["y"], feats["xt"], feats["yt"]
    names, tnames = np.array(labels)[y], np.array(labels)[yt]
    cfg = FinetuneConfig(epochs=20, patience=5, distill=2.0)
    finals = {}
    for capacity, distill in ((500, 2.0), (0, 0.0)):  # replay + distillation vs plain fine-tuning
        c = cfg.model_copy(update={"distill": distill})
        learner = IncrementalLearner(head5, labels[:5], c, capacity=capacity)
        first = y < 5
        r0 = learner.learn(x[first], names[first], xt, tnames)
        for c in range(5, 10):
            learner.learn(x[y == c], names[y == c], xt, tnames)
        acc = learner.evaluate(xt, tnames)["per_class"]
        among = learner.evaluate(xt, tnames, among=range(5))["per_class"]
        finals[capacity] = (r0.after["old_classes"], np.mean(acc[:5]), np.mean(among[:5]), acc)
        assert len(learner.steps) == 6 and learner.steps[-1].new_classes == [labels[9]]
    start, ten_way, among_first, per_class = finals[500]
    # told apart from each other as well as before; in the 10-way task the confusable new
    # classes (Shirt vs T-shirt, Pullover, Coat) cost a few points, as they do in joint training
    assert among_first > start - 0.03, finals
    assert ten_way > start - 0.08, finals
    assert np.mean(per_class[5:]) > 0.75  # and the arriving classes were learnt
    assert finals[0][1] < 0.3 and finals[0][2] < 0.6, finals  # without replay: forgotten


def test_the_server_serves_head_bundles_as_logits(head_bundle: Path) -> None:
    pytest.importorskip("starlette")
    from edgesmith.runtime.serve.oip import model_metadata
    from edgesmith.runtime.serve.swap import self_check as _self_check

    model = load(head_bundle)
    _self_check(model, head_bundle)  # the hot-swap check: golden logits through run_checked
    meta = model_metadata(model)
    assert meta["outputs"][0]["name"] == "logits" and meta["outputs"][0]["shape"] == [-1, 10]
