"""Training losses by output kind, shared by distillation, pruning fine-tuning and QAT.

Class logits: Hinton et al.'s distillation loss (KL at a temperature, plus cross-entropy on the
labels). Other outputs (``model.outputs`` kinds): ``1 - cosine`` for embeddings, mean squared error
relative to the teacher's mean square for features and regression values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["feature_loss", "kd_loss", "output_loss", "task_loss"]


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton et al.'s distillation loss: soft KL at ``temperature`` (scaled by T^2) and hard CE.

    Example:
        >>> loss = kd_loss(student_logits, teacher_logits, labels, 4.0, 0.7)  # doctest: +SKIP
    """
    import torch.nn.functional as F

    t = temperature
    soft = F.kl_div(
        F.log_softmax(student / t, dim=1),
        F.log_softmax(teacher / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    if alpha >= 1.0:
        return soft
    return alpha * soft + (1 - alpha) * F.cross_entropy(student, targets)


def feature_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """How far ``student`` outputs are from ``teacher`` (or target) values of an output that is
    not class logits: ``cosine``/``embedding``: mean ``1 - cosine``; otherwise the mean squared
    error over the teacher's mean square (scale-free: regression values may be in the hundreds)."""
    import torch.nn.functional as F

    s = student.float().reshape(len(student), -1)
    t = teacher.float().reshape(len(teacher), -1).to(s.device)
    if kind in ("embedding", "cosine"):
        return (1 - F.cosine_similarity(s, t, dim=1)).mean()
    return F.mse_loss(s, t) / (t.pow(2).mean().detach() + 1e-8)


def output_loss(
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: Any,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """The distillation loss of one output by its kind (``logits``: :func:`kd_loss`, others
    :func:`feature_loss`); ``targets`` None (or not matching the output) trains on the teacher
    alone."""
    if kind in ("logits", "kl"):
        if targets is None or getattr(targets, "dim", lambda: 0)() != 1:
            return kd_loss(student, teacher, targets, temperature, 1.0)
        return kd_loss(student, teacher, targets, temperature, alpha)
    soft = feature_loss(kind, student, teacher)
    usable = (
        targets is not None
        and hasattr(targets, "is_floating_point")
        and targets.is_floating_point()
        and targets.numel() == student.numel()
    )
    if alpha >= 1.0 or not usable:
        return soft
    return alpha * soft + (1 - alpha) * feature_loss(kind, student, targets.reshape(student.shape))


def _outputs(out: Any) -> list[Any]:
    return list(out) if isinstance(out, tuple | list) else [out]


def _target(y: Any, i: int, n: int, names: list[str]) -> Any:
    """The targets of output ``i`` of ``n``: ``y`` itself for one output, ``y[i]`` or
    ``y[name]`` for several; None when the data has no per-output targets."""
    if isinstance(y, dict):
        return y.get(names[i]) if i < len(names) else None
    if isinstance(y, tuple | list):
        return y[i] if i < len(y) else None
    return y if n == 1 else None


def task_loss(
    kinds: Sequence[str], names: Sequence[str] = (), teacher: nn.Module | None = None
) -> Callable[[Any, Any, Any], tuple[torch.Tensor, Any]]:
    """A ``fit`` loss for training a model on its own task (pruning fine-tuning, QAT): class
    logits by cross-entropy on integer labels; other outputs by :func:`feature_loss` to float
    targets of the same size, else to the ``teacher``'s outputs (a frozen copy of the model).
    Several outputs add their losses."""
    import torch
    import torch.nn.functional as F

    def loss_fn(out: Any, x: Any, y: Any) -> tuple[torch.Tensor, Any]:
        outs = _outputs(out)
        t_outs: list[Any] | None = None
        total: Any = 0.0
        for i, o in enumerate(outs):
            kind = kinds[i] if i < len(kinds) else "logits"
            t = _target(y, i, len(outs), list(names))
            if kind == "logits" and t is not None and not t.is_floating_point() and t.dim() == 1:
                total = total + F.cross_entropy(o, t)
                continue
            usable = t is not None and t.is_floating_point() and t.numel() == o.numel()
            if not usable:
                if teacher is None:
                    continue
                if t_outs is None:
                    args = tuple(x) if isinstance(x, tuple | list) else (x,)
                    teacher.to(args[0].device)
                    with torch.no_grad():
                        t_outs = _outputs(teacher(*args))
                t = t_outs[i]
                if kind == "logits":
                    total = total + kd_loss(o, t, None, 1.0, 1.0)
                    continue
            total = total + feature_loss(kind, o, t.reshape(o.shape))
        logits = outs[0] if kinds and kinds[0] == "logits" else None
        return total, logits

    return loss_fn
