"""The ``qat`` stage: quantization-aware fine-tuning with torchao's PT2E flow, then int8 per format.

For when post-training quantization cannot meet the budget. The model is exported with
``torch.export``, fake-quantized with torchao's ``prepare_qat_pt2e`` (per-channel symmetric int8
weights, asymmetric uint8 activations: the scheme the x86/Arm CPU targets run), and fine-tuned
for a few hundred steps with the shared training loop (``compress/train.py``), distilling from the model as it entered the stage. The fine-tuned
weights stay in the PyTorch model (the export shares its parameters), so every format is then
quantized with its own tool exactly as the ``quantize`` stage does (which ``qat`` registers,
with the same options) and checked with the same parity tolerances. The accuracy budget is
measured against the model as it entered ``qat``, not against the fine-tuned float model.

Example (recipe)::

    stages:
      - qat: {steps: 300, max_accuracy_drop: 0.005}
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

from pydantic import Field

from edgesmith.compress.base import Stage, StageResult, register_stage
from edgesmith.compress.losses import _outputs, _target, output_loss
from edgesmith.compress.quantize.config import QuantizeConfig
from edgesmith.errors import EdgesmithError

if TYPE_CHECKING:
    import torch

    from edgesmith.compress.base import Context

__all__ = ["QAT", "QATConfig", "prepare_qat"]


class QATConfig(QuantizeConfig):
    """Quantization-aware training options, plus every ``quantize`` option for the export.

    Attributes:
        steps: optimizer steps of fine-tuning.
        batch_size: training batch (default: ``data.batch_size``).
        lr: Adam learning rate (small: the model is already trained).
        distill: weight of the distillation loss against the model as it entered the stage
            (0: labels only).
        temperature: distillation temperature.
        eval_samples: evaluation samples for the fake-quantized accuracy in the report.
    """

    steps: int = Field(default=300, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    distill: float = Field(default=0.5, ge=0.0, le=1.0)
    temperature: float = Field(default=2.0, gt=0)
    eval_samples: int = Field(default=1000, ge=1)


def prepare_qat(model: torch.nn.Module, example: Any, layouts: Any = None) -> Any:
    """A fake-quantized training copy of ``model`` that shares its parameters (torchao PT2E).

    ``example``: one tensor, or a tuple (one per input); ``layouts``: the recipe's inputs, whose
    symbolic dimensions (a sequence length) stay dynamic besides the batch.

    Raises:
        EdgesmithError: the model cannot be captured by ``torch.export``.
    """
    import torch
    from torch.export import Dim
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from edgesmith.export._quiet import quiet

    quantizer = X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config(is_qat=True)
    )
    from edgesmith.export._io import batch_dims, dynamic_dims_of

    args = tuple(example) if isinstance(example, tuple | list) else (example,)
    xs = tuple(torch.cat([a, a]) if a.shape[0] == 1 else a for a in args)
    free = dynamic_dims_of(layouts) if layouts else batch_dims(len(xs))
    made: dict[str, Any] = {}
    shapes = tuple(
        {
            i: made.setdefault(d.name, Dim(d.name, min=d.min, max=d.max or (1 << 16)))
            for i, d in dims.items()
        }
        for dims in free
    )
    try:
        with quiet():
            ep = torch.export.export(model.train(), xs, dynamic_shapes=shapes)
            return prepare_qat_pt2e(ep.module(), quantizer)
    except Exception as exc:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise EdgesmithError(
            f"qat: torch.export cannot capture the model: {type(exc).__name__}: {first[:200]}",
            hint="use the quantize stage (post-training) for this model, or make it exportable",
        ) from exc


@register_stage
class QAT(Stage):
    """Quantization-aware fine-tuning, then int8 export of every format (see ``QATConfig``)."""

    name = "qat"
    config_cls = QATConfig

    def run(self, ctx: Context) -> StageResult:
        import numpy as np
        import torch
        import torch.nn.functional as F
        from torch.utils.data import Subset
        from torchao.quantization.pt2e import allow_exported_model_train_eval

        from edgesmith.compress.quantize.hook import install
        from edgesmith.compress.train import FitConfig, fit
        from edgesmith.measure import torch_outputs
        from edgesmith.progress import echo

        cfg = self.config
        assert isinstance(cfg, QATConfig)
        # checks formats and calibration data before training
        hook, quantization = install(ctx, cfg, stage="qat")
        t0 = time.perf_counter()
        base_accuracy = float(ctx.evaluate(ctx.model))
        hook.reference_accuracy = base_accuracy  # the budget counts from the model entering qat
        teacher = copy.deepcopy(ctx.model).eval()
        model = ctx.model
        prepared = prepare_qat(model, ctx.example_args, ctx.layouts or None)
        allow_exported_model_train_eval(prepared)  # train()/eval() switch the fake-quant observers
        batch_size = cfg.batch_size or ctx.recipe.data.batch_size
        if len(ctx.data.train) < batch_size:
            raise EdgesmithError(
                "qat: the training set is smaller than one batch",
                hint="raise data.train or lower the qat batch_size",
            )
        losses: list[float] = []
        t = cfg.temperature

        classifier = tuple(ctx.output_kinds) == ("logits",)
        names = list(ctx.output_names)

        def loss_fn(out: Any, x: Any, y: Any) -> tuple[Any, Any]:
            if not classifier:  # embeddings, regression, several outputs: losses by kind
                args = tuple(x) if isinstance(x, tuple | list) else (x,)
                with torch.no_grad():
                    t_outs = _outputs(teacher(*args))
                s_outs = _outputs(out)
                loss = sum(
                    output_loss(
                        ctx.output_kinds[i],
                        s,
                        t_outs[i],
                        _target(y, i, len(s_outs), names),
                        t,
                        cfg.distill,
                    )
                    for i, s in enumerate(s_outs)
                )
                losses.append(float(loss.detach()))
                return loss, None
            loss = F.cross_entropy(out, y)
            if cfg.distill > 0:
                with torch.no_grad():
                    soft = F.softmax(teacher(x) / t, dim=1)
                kd = F.kl_div(F.log_softmax(out / t, dim=1), soft, reduction="batchmean") * t * t
                loss = (1 - cfg.distill) * loss + cfg.distill * kd
            losses.append(float(loss.detach()))
            return loss, out

        fit(
            prepared,
            ctx.data.train,
            loss_fn,
            # Adam at a constant small rate, on the CPU (the exported graph and the teacher stay
            # there); no BatchNorm recalibration: the exported graph folds BatchNorm into ops
            FitConfig(
                steps=cfg.steps,
                lr=cfg.lr,
                batch_size=batch_size,
                optimizer="adam",
                schedule="constant",
                seed=ctx.recipe.seed,
                device="cpu",
                bn_batches=0,
            ),
            description="qat fine-tuning",
            collate_fn=getattr(ctx.data, "collate", None),
        )
        # the export shares the parameters; copy explicitly anyway so the contract is visible
        trained = prepared.state_dict()
        own = model.state_dict()
        missing = [k for k in own if k not in trained]
        if missing:
            raise EdgesmithError(
                f"qat: the fine-tuned graph lacks {len(missing)} of the model's tensors ({missing[0]}, ...)",
                hint="use the quantize stage (post-training) for this model",
            )
        model.load_state_dict({k: trained[k] for k in own})
        model.eval()
        n = min(cfg.eval_samples, len(ctx.data.eval))
        sub = Subset(ctx.data.eval, list(range(n)))
        fq: dict[str, Any] = {}
        with torch.no_grad():
            if classifier:
                fq_out, targets = torch_outputs(prepared, sub)
                fq_accuracy = float((np.asarray(fq_out).argmax(1) == targets).mean())
                fq["fake_quant_top1"] = round(fq_accuracy, 6)
                what = "top-1"
            else:  # the recipe's metric on the fake-quantized graph
                from edgesmith.feeds import read_split, user_outputs
                from edgesmith.measure import torch_run
                from edgesmith.metrics import get_metric

                samples, targets = read_split(sub, ctx.layouts, "eval")
                outs = torch_run(prepared, samples)
                fq_accuracy = float(
                    get_metric(ctx.recipe.metric)(user_outputs(outs, names), targets)
                )
                fq["fake_quant_metric"] = round(fq_accuracy, 6)
                what = "metric"
        k = max(1, len(losses) // 10)
        echo(
            f"qat: {cfg.steps} steps, loss {losses[0]:.4f} -> {np.mean(losses[-k:]):.4f}; "
            f"fake-quantized {what} {fq_accuracy:.4f} on {n} samples (float before: {base_accuracy:.4f})"
        )
        return StageResult(
            {
                "quantization": quantization,
                "qat": {
                    "steps": cfg.steps,
                    "loss_first": round(float(np.mean(losses[:k])), 5),
                    "loss_last": round(float(np.mean(losses[-k:])), 5),
                    "accuracy_before": round(base_accuracy, 6),
                    **fq,
                    "fake_quant_samples": n,
                    "seconds": round(time.perf_counter() - t0, 1),
                },
            }
        )
