"""Training losses by output kind (distillation, pruning fine-tuning, QAT): embeddings are trained
by cosine, regression values by relative squared error, logits by KL + cross-entropy."""

from __future__ import annotations

import pytest
import torch

from edgesmith.compress.losses import feature_loss, output_loss, task_loss


def _emb(n: int = 8, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def test_an_embedding_is_distilled_by_cosine_not_by_softmax() -> None:
    t = _emb()
    # the same direction at another scale is the same embedding: no loss by cosine, while a
    # softmax KL would see different "class distributions"
    assert output_loss("embedding", 3 * t, t, None, 4.0, 0.7).item() == pytest.approx(0, abs=1e-6)
    assert output_loss("logits", 3 * t, t, None, 4.0, 0.7).item() > 1e-3
    other = _emb(seed=1)
    far = output_loss("embedding", other, t, None, 4.0, 0.7).item()
    assert far == pytest.approx((1 - (other * t).sum(1)).mean().item(), rel=1e-5)


def test_regression_loss_is_scale_free_and_uses_float_targets() -> None:
    t = torch.tensor([[150.0], [80.0], [300.0]])
    s = t * 1.1
    rel = feature_loss("regression", s, t).item()
    assert rel == pytest.approx(feature_loss("regression", s / 100, t / 100).item(), rel=1e-5)
    # with targets (alpha < 1) the loss mixes the teacher's values and the true ones
    y = t * 0.9
    mixed = output_loss("regression", s, t, y, 4.0, 0.5).item()
    assert mixed == pytest.approx(0.5 * rel + 0.5 * feature_loss("regression", s, y).item())


def test_task_loss_trains_an_embedding_towards_the_teacher_when_there_are_no_targets() -> None:
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 8)
    student = torch.nn.Linear(4, 8)
    loss_fn = task_loss(("embedding",), ("embedding",), teacher=teacher)
    x = torch.randn(32, 4)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    first = None
    for _ in range(60):
        loss, logits = loss_fn(student(x), x, None)
        assert logits is None  # nothing to score by argmax
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
