"""Issue 14: learning new classes on the device without forgetting the old ones. The build ships a
memory of its classes (herding exemplars from the training data, held-out samples from the
evaluation data); fine-tuning keeps the old classes by default and reports old, new and all
classes before and after. Real SmallCNN bundles, real Fashion-MNIST, real handwritten digits."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from edgesmith.errors import BundleError
from edgesmith.runtime import load
from edgesmith.runtime.bundle import read_bundle, verify_bundle
from edgesmith.runtime.finetune.memory import (
    MEMORY_FILE,
    OldClassCheck,
    align_weights,
    herding,
    load_memory,
    memory_bytes,
)
from tests.finetune_helpers import digits28, fmnist


def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """About 125 training and 55 held-out images per digit (the issue's case), as names."""
    x, y = digits28()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    tr, va = order[:1250], order[1250:]
    names = np.asarray([f"digit-{d}" for d in y])
    return x[tr], names[tr], x[va], names[va]


def _key(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, np.float16).tobytes()


def test_the_build_ships_a_memory_of_its_classes(mlp_head_bundle: Path) -> None:
    """memory.npz is a listed, hashed bundle file; exemplars come from the training images and
    the held-out samples from the evaluation images (3 and 7 per class); its size is reported."""
    from edgesmith.runtime.specs import TensorSpec, preprocess_images

    m = read_bundle(mlp_head_bundle)
    spec = m.trainable_head["memory"]
    entry = m.files[MEMORY_FILE]
    assert entry.size == (mlp_head_bundle / MEMORY_FILE).stat().st_size == spec["bytes"]
    assert spec["form"] == "inputs"  # 784 input values per sample < 3,136 features
    with np.load(mlp_head_bundle / MEMORY_FILE) as z:  # 8-bit images: stored exactly as uint8
        assert z["exemplars"].dtype == np.uint8 and z["holdout"].dtype == np.uint8
    assert (spec["exemplars_per_class"], spec["holdout_per_class"], spec["budget"]) == (3, 7, 0.02)
    mem = load_memory(mlp_head_bundle, m.trainable_head)
    assert mem is not None and mem.class_names == m.labels
    assert np.bincount(mem.exemplar_labels).tolist() == [3] * 10
    assert np.bincount(mem.holdout_labels).tolist() == [7] * 10
    spec_in = TensorSpec("input", ("batch", 1, 28, 28), "float32")
    pools = {}
    for split in ("train", "test"):
        x, y = fmnist(split)
        inputs = preprocess_images(x, m.preprocess, spec_in)
        pools[split] = {_key(a): int(c) for a, c in zip(inputs, y, strict=True)}
    assert all(
        pools["train"].get(_key(a)) == c
        for a, c in zip(mem.exemplars, mem.exemplar_labels, strict=True)
    )
    assert all(
        pools["test"].get(_key(a)) == c
        for a, c in zip(mem.holdout, mem.holdout_labels, strict=True)
    )
    # the reference accuracy is the shipped head's on those held-out samples, this backbone
    model = load(mlp_head_bundle)
    acc = float((model(mem.holdout.astype(np.float32)).argmax(1) == mem.holdout_labels).mean())
    assert spec["reference_accuracy"] == pytest.approx(acc, abs=1e-9) and acc > 0.85
    report = json.loads((mlp_head_bundle.parents[1] / "report.json").read_text())
    info = report["artifacts"][0]["memory"]
    assert info["bytes"] == spec["bytes"] and 0 < info["share_of_bundle"] < 0.10


def test_a_changed_memory_file_fails_verification(mlp_head_bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(mlp_head_bundle, copy)
    raw = bytearray((copy / MEMORY_FILE).read_bytes())
    raw[-40] ^= 0xFF
    (copy / MEMORY_FILE).write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="memory.npz"):
        verify_bundle(copy)


def test_an_unlisted_memory_file_is_refused(mlp_head_bundle: Path, tmp_path: Path) -> None:
    """Like golden data, the memory is a file the bundle uses: listed and hashed, or refused."""
    import shutil

    from edgesmith.runtime.bundle import MANIFEST, canonical_bytes

    copy = tmp_path / "b"
    shutil.copytree(mlp_head_bundle, copy)
    (copy / "manifest.sig").unlink(missing_ok=True)
    doc = json.loads((copy / MANIFEST).read_text())
    del doc["files"][MEMORY_FILE]
    (copy / MANIFEST).write_bytes(canonical_bytes(doc))
    with pytest.raises(BundleError, match="names memory file .* does not list it"):
        read_bundle(copy)


def test_malformed_memory_files_are_refused(mlp_head_bundle: Path, tmp_path: Path) -> None:
    spec = {"memory": read_bundle(mlp_head_bundle).trainable_head["memory"]}
    ok = np.zeros((2, 4), np.float16)
    cases = {
        "pickled": dict(
            exemplars=np.array([{"a": 1}], dtype=object), exemplar_labels=np.zeros(1, np.int64)
        ),
        "float32": dict(exemplars=ok.astype(np.float32), exemplar_labels=np.zeros(2, np.int64)),
        "labels": dict(exemplars=ok, exemplar_labels=np.array([0, 7], np.int64)),
    }
    for arrays in cases.values():
        buf = io.BytesIO()
        np.savez(
            buf,
            **arrays,
            holdout=ok,
            holdout_labels=np.zeros(2, np.int64),
            class_names=np.array(["a", "b"]),
        )
        (tmp_path / MEMORY_FILE).write_bytes(buf.getvalue())
        with pytest.raises(BundleError, match="memory file"):
            load_memory(tmp_path, spec)
    (tmp_path / MEMORY_FILE).unlink()
    with pytest.raises(BundleError, match="missing"):
        load_memory(tmp_path, spec)


def test_herding_exemplars_track_the_class_mean() -> None:
    """On real images, the mean of 10 herding picks is closer to the class mean than the mean of
    any of 20 random sets of 10."""
    x, y = fmnist("test")
    f = x[y == 3][:500].reshape(500, -1).astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    mu = f.mean(0)
    picked = herding(f, 10)
    assert len(set(picked.tolist())) == 10
    d_herd = np.linalg.norm(f[picked].mean(0) - mu)
    rng = np.random.default_rng(0)
    d_rand = [np.linalg.norm(f[rng.choice(500, 10, replace=False)].mean(0) - mu) for _ in range(20)]
    assert d_herd < min(d_rand)


def test_weight_aligning_equalises_the_new_rows(head_bundle: Path) -> None:
    head = load(head_bundle).head
    grown = head.add_classes(2, np.random.default_rng(0))
    w = grown.params["layers.0.weight"]
    w[10:] = 3 * w[:2]  # new rows three times too long
    grown.params["layers.0.bias"][10:] = 1.0
    aligned, gamma = align_weights(grown, 10)
    norms = np.linalg.norm(aligned.params["layers.0.weight"], axis=1)
    assert norms[10:].mean() == pytest.approx(norms[:10].mean(), rel=1e-5)
    assert gamma < 1 and np.allclose(aligned.params["layers.0.weight"][:10], w[:10])
    assert align_weights(head, 10)[1] == 1.0  # nothing new: unchanged


def test_old_class_check_names_accuracy_before_and_after() -> None:
    c = OldClassCheck(0.93, 0.41, 100, 10, 0.02, "installed head")
    assert not c.passed and c.drop == pytest.approx(0.52)
    msg = c.message()
    assert "0.9300 (installed head) -> 0.4100" in msg and "-52.0 points; budget 2.0" in msg
    assert OldClassCheck(0.93, 0.915, 100, 10, 0.02, "x").passed


def test_adding_ten_digit_classes_keeps_the_fashion_classes(mlp_head_bundle: Path) -> None:
    """The issue's scenario: ten classes of real handwritten digits added to the Fashion-MNIST
    MLP head. By default the old classes keep their accuracy (on the shipped held-out samples and
    on 1,000 Fashion-MNIST test images) and the digits are learnt; plain fine-tuning forgets and
    its result says so."""
    model = load(mlp_head_bundle)
    xt, yt, xv, yv = _digits_split()
    res = model.finetune(xt, yt, add_classes=True, holdout=(xv, yv), epochs=15)
    m = res.metrics
    assert m["classes"]["new_classes"]["after"] >= 0.9
    assert m["classes"]["old_classes"]["samples"] == 70
    assert m["classes"]["old_classes"]["before"] == pytest.approx(
        read_bundle(mlp_head_bundle).trainable_head["memory"]["reference_accuracy"]
    )
    assert m["old_class_check"]["passed"] and m["old_class_check"]["drop"] <= 0.02
    assert res.trained["isolated"] and res.trained["grown_units"] == 20
    assert res.trained["memory_samples"] == 30
    xf, yf = fmnist("test")
    feats = model.features(xf[:1000])
    before = (model.head(feats).argmax(1) == yf[:1000]).mean()
    after = (res.head(feats).argmax(1) == yf[:1000]).mean()
    assert after >= before - 0.02
    plain = model.finetune(
        xt,
        yt,
        add_classes=True,
        holdout=(xv, yv),
        epochs=20,
        memory=False,
        isolate=False,
        distill=0,
    )
    check = plain.metrics["old_class_check"]  # measured even when not trained on
    assert not check["passed"] and check["after"] < 0.5
    assert (plain.head(feats).argmax(1) == yf[:1000]).mean() < 0.5


def test_the_new_version_keeps_the_memory(mlp_head_bundle: Path, tmp_path: Path) -> None:
    from edgesmith.runtime.finetune.head import backbone_fingerprint

    model = load(mlp_head_bundle)
    xt, yt, xv, yv = _digits_split()
    out = tmp_path / "v2"
    model.finetune(xt[:300], yt[:300], add_classes=True, holdout=(xv, yv), epochs=3, out=out)
    old, new = read_bundle(mlp_head_bundle), read_bundle(out)
    assert new.trainable_head["memory"] == old.trainable_head["memory"]
    assert new.files[MEMORY_FILE] == old.files[MEMORY_FILE]
    assert backbone_fingerprint(new) == backbone_fingerprint(old)
    doc = new.metrics
    assert {"old_classes", "new_classes", "all_classes"} <= set(doc["classes"])
    assert "old_class_check" in doc
    grown = load(out).head
    assert grown.classes == 20 and grown.layers[0].out_features == 64 + 20


def test_memory_bytes_round_trip(tmp_path: Path) -> None:
    x = np.arange(24, dtype=np.float32).reshape(3, 8)
    data = memory_bytes(x, np.array([0, 1, 1]), x[:1], np.array([1]), ["a", "b"])
    (tmp_path / MEMORY_FILE).write_bytes(data)
    spec = {
        "memory": {
            "form": "features",
            "exemplars_per_class": 2,
            "holdout_per_class": 1,
            "classes": 2,
            "bytes": len(data),
        }
    }
    mem = load_memory(tmp_path, spec)
    assert mem is not None and mem.exemplars.dtype == np.float16
    assert mem.names("exemplars").tolist() == ["a", "b", "b"]
    assert np.array_equal(mem.features(None, "holdout"), x[:1])


def test_inputs_made_from_8_bit_images_are_stored_as_uint8(tmp_path: Path) -> None:
    """Preprocessed Fashion-MNIST inputs take one byte a value, and decode to what float16
    storage would give; inputs that are not an affine image of 8-bit values stay float16."""
    x, _ = fmnist("test")
    inputs = ((x[:50] / 255.0 - 0.286) / 0.353).astype(np.float32)[:, None]
    labels = np.zeros(50, np.int64)
    data = memory_bytes(inputs, labels, inputs[:10], labels[:10], ["a"])
    with np.load(io.BytesIO(data)) as z:
        assert z["exemplars"].dtype == np.uint8 and z["holdout"].dtype == np.uint8
    (tmp_path / MEMORY_FILE).write_bytes(data)
    spec = {
        "memory": {
            "form": "inputs",
            "exemplars_per_class": 50,
            "holdout_per_class": 10,
            "classes": 1,
            "bytes": len(data),
        }
    }
    mem = load_memory(tmp_path, spec)
    assert mem is not None
    assert np.array_equal(mem.exemplars, inputs.astype(np.float16))
    noisy = inputs + np.random.default_rng(0).normal(0, 1e-3, inputs.shape).astype(np.float32)
    with np.load(io.BytesIO(memory_bytes(noisy, labels, noisy[:1], labels[:1], ["a"]))) as z:
        assert z["exemplars"].dtype == np.float16
