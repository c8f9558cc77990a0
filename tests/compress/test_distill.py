"""Distillation and the shared training loop on real Fashion-MNIST: KD loss, hints, checkpoints,
resume, early stopping, determinism, and the clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgesmith.compress.distill import DistillConfig, _adapter, distill, kd_loss
from edgesmith.compress.train import FitConfig, fit
from edgesmith.errors import CompressionError
from tests.compress.conftest import EXAMPLE, MODELS, accuracy, run_main, trained
from tests.golden import assert_structure


def _quick(**kw) -> DistillConfig:
    base = {"epochs": 1, "lr": 2e-3, "batch_size": 64, "max_steps_per_epoch": 3, "device": "cpu"}
    return DistillConfig(**{**base, **kw})


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_kd_loss_is_hintons_formula() -> None:
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    p_t = F.softmax(t / 4, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 4, 1))).sum(1).mean() * 16
    expected = 0.7 * kl + 0.3 * F.cross_entropy(s, y)
    torch.testing.assert_close(kd_loss(s, t, y, 4.0, 0.7), expected)
    assert kd_loss(t, t, y, 4.0, 1.0).abs() < 1e-6  # a student equal to its teacher: no soft loss


def test_distillation_recovers_the_pruned_cnn(pruned_cnn: nn.Module, fmnist) -> None:
    acc0 = accuracy(pruned_cnn, fmnist.eval)
    cfg = _quick(epochs=1, max_steps_per_epoch=None)  # 16 steps over 1,024 real images
    result = distill(pruned_cnn, trained("SmallCNN"), fmnist.train, cfg, EXAMPLE, seed=0)
    acc = accuracy(pruned_cnn, fmnist.eval)
    assert acc > acc0 + 0.05, (acc0, acc)
    assert result.epochs_run == 1 and result.world_size == 1
    assert not any(
        isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in pruned_cnn.modules()
    )


def test_hints_create_adapters_and_train(pruned_cnn: nn.Module, fmnist) -> None:
    s = torch.zeros(2, 40, 7, 7)
    assert isinstance(_adapter(s, torch.zeros(2, 64, 7, 7), "p"), nn.Sequential)
    pooled = _adapter(s, torch.zeros(2, 64, 3, 3), "p")
    assert pooled(s).shape == (2, 64, 3, 3)
    assert isinstance(_adapter(torch.zeros(2, 5, 8), torch.zeros(2, 5, 16), "p"), nn.Linear)
    assert isinstance(_adapter(s, s, "p"), nn.Identity)
    with pytest.raises(CompressionError, match="cannot match"):
        _adapter(torch.zeros(2, 8), torch.zeros(2, 8, 3, 3), "'a:b'")
    before = _state(pruned_cnn)
    cfg = _quick(hints=["features", "classifier.1"], hint_weight=0.5)
    result = distill(pruned_cnn, trained("SmallCNN"), fmnist.train, cfg, EXAMPLE, seed=0)
    assert result.history[0]["loss"] > 0
    assert any(not torch.equal(before[k], v) for k, v in pruned_cnn.state_dict().items())
    assert set(pruned_cnn.state_dict()) == set(before)  # the adapters are not left in the student
    with pytest.raises(
        CompressionError, match="hint layer 'featurez' is not a layer of the student"
    ):
        distill(
            pruned_cnn,
            trained("SmallCNN"),
            fmnist.train,
            _quick(hints=["featurez:features"]),
            EXAMPLE,
        )


def test_same_seed_same_weights(pruned_cnn: nn.Module, fmnist) -> None:
    import copy

    a, b = copy.deepcopy(pruned_cnn), copy.deepcopy(pruned_cnn)
    teacher = trained("SmallCNN")
    distill(a, teacher, fmnist.train, _quick(), EXAMPLE, seed=3)
    distill(b, teacher, fmnist.train, _quick(), EXAMPLE, seed=3)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


class _Crash(Exception):
    pass


def test_resume_after_a_crash_continues_exactly(
    pruned_cnn: nn.Module, fmnist, tmp_path: Path
) -> None:
    import copy

    teacher = trained("SmallCNN")
    cfg = _quick(epochs=2, max_steps_per_epoch=2)

    def rising(model: nn.Module) -> float:  # every epoch is the best so far
        rising.calls += 1  # type: ignore[attr-defined]
        return rising.calls  # type: ignore[attr-defined]

    rising.calls = 0  # type: ignore[attr-defined]
    straight = copy.deepcopy(pruned_cnn)
    distill(straight, teacher, fmnist.train, cfg, EXAMPLE, evaluate=rising, seed=1)
    # a run that crashes at the end of epoch 2: its checkpoint holds epoch 1 ...
    calls = iter([1.0])

    def crash(model: nn.Module) -> float:
        for v in calls:
            return v
        raise _Crash

    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Crash):
        distill(
            copy.deepcopy(pruned_cnn),
            teacher,
            fmnist.train,
            cfg,
            EXAMPLE,
            evaluate=crash,
            checkpoint_dir=ckpt,
            seed=1,
        )
    assert (ckpt / "last.pt").is_file()
    # ... and a fresh process resumes it from there (its student still untrained)
    rising.calls = 1  # type: ignore[attr-defined]
    resumed = copy.deepcopy(pruned_cnn)
    result = distill(
        resumed,
        teacher,
        fmnist.train,
        cfg,
        EXAMPLE,
        evaluate=rising,
        checkpoint_dir=ckpt,
        resume=True,
        seed=1,
    )
    assert result.resumed_from == 1 and result.epochs_run == 2 and result.best_epoch == 2
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_checkpoint_of_another_model_is_refused_untouched(
    pruned_cnn: nn.Module, fmnist, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    teacher = trained("SmallCNN")
    distill(pruned_cnn, teacher, fmnist.train, _quick(), EXAMPLE, checkpoint_dir=ckpt)
    before = (ckpt / "last.pt").read_bytes()
    other = MODELS.SmallCNN(width=16)
    with pytest.raises(CompressionError, match="written for another model .*shapes differ"):
        distill(other, teacher, fmnist.train, _quick(), EXAMPLE, checkpoint_dir=ckpt, resume=True)
    with pytest.raises(CompressionError, match="already exists"):  # no silent overwrite either
        distill(pruned_cnn, teacher, fmnist.train, _quick(), EXAMPLE, checkpoint_dir=ckpt)
    assert (ckpt / "last.pt").read_bytes() == before


@pytest.mark.parametrize("damage", ["no-history", "epoch-text"])
def test_an_incomplete_checkpoint_is_a_clear_error(
    pruned_cnn: nn.Module, tmp_path: Path, damage: str
) -> None:
    """A checkpoint with the right kind but a missing or mistyped field (written by another
    version, edited by hand) is named, not a KeyError (exit 70)."""
    from edgesmith.compress.train import _KIND, _fingerprint, load_checkpoint

    ckpt = {
        "kind": _KIND,
        "fingerprint": json.dumps(_fingerprint(pruned_cnn)),
        "model": pruned_cnn.state_dict(),
        "optimizer": {},
        "epoch": 1,
        "best_metric": 0.5,
        "best_epoch": 1,
        "wait": 0,
        "best_model": None,
        "history": "[]",
        "world_size": 1,
    }
    if damage == "no-history":
        del ckpt["history"]
    else:
        ckpt["epoch"] = "one"
    path = tmp_path / "last.pt"
    torch.save(ckpt, path)
    match = "incomplete .no history" if damage == "no-history" else "damaged"
    with pytest.raises(CompressionError, match=match):
        load_checkpoint(path, pruned_cnn)


def test_teacher_with_other_outputs_is_refused(pruned_cnn: nn.Module, fmnist) -> None:
    with pytest.raises(
        CompressionError,
        match=r"teacher's output has shape \[1, 12\] but the student's has \[1, 10\]",
    ):
        distill(pruned_cnn, MODELS.SmallCNN(num_classes=12), fmnist.train, _quick(), EXAMPLE)
    wrong_input = nn.Sequential(nn.Flatten(), nn.Linear(100, 10))
    with pytest.raises(CompressionError, match="teacher .* cannot run the model input"):
        distill(pruned_cnn, wrong_input, fmnist.train, _quick(), EXAMPLE)


def test_early_stopping_restores_the_best_epoch(pruned_cnn: nn.Module, fmnist) -> None:
    snapshots: list[dict[str, torch.Tensor]] = []
    scores = iter([0.5, 0.9, 0.8, 0.7, 0.6])  # best after epoch 2, then worse

    def evaluate(model: nn.Module) -> float:
        snapshots.append(_state(model))
        return next(scores)

    def loss_fn(out, x, y):
        return F.cross_entropy(out, y), out

    cfg = FitConfig(epochs=5, patience=2, max_steps_per_epoch=2, device="cpu")
    result = fit(pruned_cnn, fmnist.train, loss_fn, cfg, evaluate=evaluate)
    assert result.stopped_early and result.epochs_run == 4 and result.best_epoch == 2
    for k, v in pruned_cnn.state_dict().items():
        assert torch.equal(v, snapshots[1][k]), k


def test_batchnorm_recalibration_averages_fresh_batch_statistics(fmnist) -> None:
    from edgesmith.compress.train import recalibrate_batchnorm_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.01)).eval()
    data = torch.utils.data.Subset(fmnist.train, range(96))
    xs = torch.stack([data[i][0] for i in range(96)])
    assert recalibrate_batchnorm_(model, data, 32, 3, seed=0, dev=torch.device("cpu"))
    with torch.no_grad():
        expected = model[0](xs).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model[1].running_mean, expected, rtol=1e-4, atol=1e-5)
    assert model[1].momentum == 0.01 and not model.training
    assert not recalibrate_batchnorm_(nn.Linear(2, 2), data, 32, 3, 0, torch.device("cpu"))


def test_distill_command_with_resume(cnn_recipe: Path, pruned_cnn: nn.Module, capsys) -> None:
    from edgesmith.compress.pruning.structure import save_model

    folder = cnn_recipe.parent
    cnn_recipe.write_text(cnn_recipe.read_text().replace("train: 512", "train: 256"))
    save_model(pruned_cnn, folder / "p.safetensors")
    out = folder / "d.safetensors"
    args = ["distill", str(cnn_recipe), "--student", str(folder / "p.safetensors"), "-o", str(out)]
    code, stdout, err = run_main([*args, "--epochs", "1", "--json"], capsys)
    assert code == 0, err
    assert_structure("distill-command-row", json.loads(stdout[stdout.index("{") :]))
    assert "student accuracy" in err and (folder / "d.ckpt" / "last.pt").is_file()
    # the checkpoint is not silently reused or overwritten ...
    code, _, err = run_main([*args, "--force", "--epochs", "2"], capsys)
    assert code == 2 and "--resume" in err
    # ... --resume continues it with one more epoch
    code, stdout, err = run_main([*args, "--force", "--epochs", "2", "--resume", "--json"], capsys)
    assert code == 0, err
    assert (
        "resumed from" in err
        and '"resumed_from_epoch": 1' in stdout
        and '"epochs_run": 2' in stdout
    )
    # a student of another width is refused by the same checkpoint
    code, _, err = run_main(
        [
            *args[:2],
            "--student",
            f"{folder / 'model.py'}:SmallCNN",
            "--student-kwargs",
            '{"width": 16}',
            "-o",
            str(out),
            "--force",
            "--resume",
        ],
        capsys,
    )
    assert code == 2 and "written for another model" in err


def test_distill_command_enforces_the_recipes_budget(
    cnn_recipe: Path, pruned_cnn: nn.Module, capsys
) -> None:
    from edgesmith.compress.pruning.structure import save_model

    folder = cnn_recipe.parent
    text = cnn_recipe.read_text().replace("train: 512", "train: 128")
    cnn_recipe.write_text(
        text.replace("alpha: 0.7}", "alpha: 0.7, max_accuracy_drop: 0.0, max_steps_per_epoch: 2}")
    )
    save_model(pruned_cnn, folder / "p.safetensors")
    out = folder / "d.safetensors"
    args = ["distill", str(cnn_recipe), "--student", str(folder / "p.safetensors"), "-o", str(out)]
    code, _, err = run_main(args, capsys)
    assert code == 1, err  # two steps of training cannot close the gap to the teacher
    assert "more than max_accuracy_drop 0.0" in err and not out.exists()


def test_stage_loads_a_named_teacher_and_counts_the_budget_from_the_recipes_model(
    pruned_cnn: nn.Module, fmnist, tmp_path: Path
) -> None:
    """``teacher:`` in the stage's options is built by ctx.load_model (the build's model loader);
    ``max_accuracy_drop`` counts from the recipe's model (ctx.teacher), not from that teacher."""
    from edgesmith.compress.base import Context
    from edgesmith.compress.distill import Distill, ModelSpec
    from edgesmith.models import build_model
    from edgesmith.recipe import load_recipe
    from tests.conftest import FMNIST_DIR, FMNIST_RECIPE

    untrained = MODELS.SmallCNN().eval()  # the "recipe's model" here: ~10% top-1
    loaded: list[object] = []

    def load_model(config):  # type: ignore[no-untyped-def]
        loaded.append(config)
        return build_model(config)

    def evaluate(m: nn.Module) -> float:
        return accuracy(m, fmnist.eval)

    ctx = Context(
        recipe=load_recipe(FMNIST_RECIPE),
        model=pruned_cnn,
        teacher=untrained,
        data=fmnist,
        example_input=EXAMPLE,
        evaluate=evaluate,
        work_dir=tmp_path,
        load_model=load_model,
    )
    spec = ModelSpec(factory=f"{FMNIST_DIR / 'model.py'}:SmallCNN", weights="weights.safetensors")
    result = Distill(_quick(teacher=spec, max_accuracy_drop=0.0)).run(ctx)
    (config,) = loaded
    assert config.weights == str(FMNIST_DIR / "weights.safetensors")  # relative to the recipe
    assert result.row["teacher_accuracy"] > 0.9  # the named, trained teacher was used
    (check,) = result.checks
    assert check.key == "max_accuracy_drop" and check.passed  # far above the untrained model
    assert check.measured == round(evaluate(untrained) - evaluate(pruned_cnn), 6)
    ctx.load_model = None
    with pytest.raises(CompressionError, match="cannot load the 'teacher'/'student'"):
        Distill(_quick(teacher=spec)).run(ctx)
