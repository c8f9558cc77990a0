"""Output kinds: parity and golden rules (edgesmith.runtime.outputs), numpy only."""

from __future__ import annotations

import numpy as np
import pytest

from edgesmith.export.parity import compare
from edgesmith.runtime.outputs import compare_golden_outputs, failures, golden_arrays, measure


def _embeddings(n: int = 64, d: int = 384, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((n, d))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    return ref, ref + noise * rng.standard_normal((n, d)) / np.sqrt(d)


def test_an_embedding_is_never_judged_by_its_argmax() -> None:
    ref, cand = _embeddings()
    as_logits = measure("logits", ref, cand)
    as_embedding = measure("embedding", ref, cand)
    # the largest coordinate of a nearly identical embedding changes often: argmax says little
    assert as_logits["top1_agreement"] < 0.97
    assert as_embedding["mean_cosine"] > 0.99 and "top1_agreement" not in as_embedding
    tol = {"top1_agreement": 0.97, "mean_cosine": 0.98, "min_cosine": 0.9, "max_rel_l2": None}
    assert failures("logits", as_logits, tol) and not failures("embedding", as_embedding, tol)
    p = compare([ref], [cand], ["embedding"], [tol], ["embedding"])
    assert (
        p.passed
        and p.top1_agreement is None
        and p.agreement == pytest.approx(as_embedding["mean_cosine"])
    )
    assert p.to_json()["outputs"]["embedding"]["kind"] == "embedding"


def test_a_broken_embedding_fails_on_cosine() -> None:
    ref, _ = _embeddings()
    cand = ref.copy()
    cand[5] = -cand[5]  # one sample pointing the other way
    p = compare([ref], [cand], ["embedding"], [{"mean_cosine": 0.98, "min_cosine": 0.9}])
    assert not p.passed and "min cosine -1.0000 < 0.9" in p.reason


def test_regression_by_relative_and_absolute_error() -> None:
    ref = np.linspace(25, 346, 50)[:, None]
    close, off = ref * 1.001, ref + 20.0
    assert measure("regression", ref, close)["rel_l2"] == pytest.approx(1e-3, rel=1e-6)
    assert not failures("regression", measure("regression", ref, close), {"max_rel_l2": 0.01})
    bad = failures("regression", measure("regression", ref, off), {"max_rel_l2": 0.01})
    assert bad and bad[0].startswith("relative L2")
    assert failures("regression", measure("regression", ref, off), {"max_abs_error": 5.0})


def test_several_outputs_each_by_its_kind() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((40, 2)) * 5
    value = rng.uniform(25, 346, (40, 1))
    tol = [{"max_rel_l2": 0.01}, {"top1_agreement": 0.99, "max_abs_diff": None}]
    p = compare(
        [value, logits],
        [value * 1.5, logits],
        ["regression", "logits"],
        tol,
        ["progression", "risk"],
    )
    assert not p.passed and "output 'progression'" in p.reason and "'risk'" not in p.reason
    assert p.top1_agreement == 1.0  # of the logits output, whatever comes first


def test_golden_check_per_output() -> None:
    ref, cand = _embeddings(8, 16, noise=1e-6)
    golden = {
        "atol": 1e-3,
        "rtol": 1e-3,
        "top1": False,
        "outputs": [{"name": "embedding", "kind": "embedding", "min_cosine": 0.9999}],
    }
    assert compare_golden_outputs([cand], [ref], golden, ["embedding"]).ok
    flipped = cand.copy()
    flipped[0] = -flipped[0]
    r = compare_golden_outputs([flipped], [ref], golden, ["embedding"])
    assert not r.ok and "differ by up to" in r.reason
    # a classifier's golden keeps the top-1 rule of old bundles
    logits = np.asarray([[0.0, 1.0], [1.0, 0.0]])
    old = {"atol": 1.0, "rtol": 0.0, "top1": True}
    r = compare_golden_outputs([logits[:, ::-1]], [logits], old, ["output"])
    assert not r.ok and "top-1 agreement 0.000 < 1" in r.reason


def test_golden_arrays_old_and_named_layouts() -> None:
    x, y = np.zeros((2, 3)), np.ones((2, 4))
    assert [a.shape for a in golden_arrays({"inputs": x, "outputs": y}, ["input"], ["out"])[0]] == [
        (2, 3)
    ]
    named = {"inputs/ids": x, "inputs/mask": x, "outputs/a": y, "outputs/b": y[:, :1]}
    ins, outs = golden_arrays(named, ["ids", "mask"], ["a", "b"])
    assert len(ins) == 2 and [o.shape for o in outs] == [(2, 4), (2, 1)]
    with pytest.raises(KeyError):
        golden_arrays(named, ["ids", "token_type_ids"], ["a", "b"])
