"""Split a PyTorch model into a backbone (exported) and a trainable head (shipped as arrays).

Used by ``build`` when the recipe has ``trainable_head``: the exported model is the backbone (the
head submodule replaced by ``nn.Identity``), so every artifact variant (fp32, int8...) is a backbone;
the head's weights become a :class:`edgesmith.runtime.finetune.head.Head` that the device runs and trains in
numpy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgesmith.errors import RecipeError
from edgesmith.runtime.finetune.head import Head, LayerSpec

if TYPE_CHECKING:
    import torch

__all__ = ["SplitModel", "split_head"]

_HINT = "name an nn.Linear, or an nn.Sequential of Linear/ReLU/Dropout, that is the last step of forward()"


@dataclass
class SplitModel:
    """The model cut at its head: ``backbone(x)`` gives features, ``module`` is the torch head."""

    backbone: torch.nn.Module
    module: torch.nn.Module
    head: Head
    name: str

    def composed(self, backbone: torch.nn.Module | None = None) -> torch.nn.Module:
        """``head(backbone(x))`` as one module (for accuracy checks of backbone variants)."""
        import torch

        return torch.nn.Sequential(backbone or self.backbone, torch.nn.Flatten(1), self.module)


def _layers(module: Any, name: str) -> tuple[list[LayerSpec], dict[str, np.ndarray]]:
    from torch import nn

    children = list(module) if isinstance(module, nn.Sequential) else [module]
    layers: list[LayerSpec] = []
    params: dict[str, np.ndarray] = {}
    for pos, child in enumerate(children):
        if isinstance(child, nn.Linear):
            i = len(layers)
            layers.append(
                LayerSpec(
                    type="linear", in_features=child.in_features, out_features=child.out_features
                )
            )
            params[f"layers.{i}.weight"] = child.weight.detach().float().cpu().numpy().copy()
            bias = child.bias
            params[f"layers.{i}.bias"] = (
                bias.detach().float().cpu().numpy().copy()
                if bias is not None
                else np.zeros(child.out_features, np.float32)
            )
        elif isinstance(child, nn.ReLU):
            layers.append(LayerSpec(type="relu"))
        elif isinstance(child, nn.Dropout):
            layers.append(LayerSpec(type="dropout", p=float(child.p)))
        elif isinstance(child, nn.Identity):
            continue
        elif (
            isinstance(child, nn.Flatten)
            and pos == 0
            and child.start_dim == 1
            and child.end_dim == -1
        ):
            continue  # the device flattens backbone outputs per sample anyway
        else:
            raise RecipeError(
                f"trainable_head.module '{name}' contains a {type(child).__name__}, which a device "
                "head cannot run",
                hint=_HINT,
            )
    if not layers or layers[-1].type != "linear":
        raise RecipeError(
            f"trainable_head.module '{name}' must end with an nn.Linear (the logits)", hint=_HINT
        )
    return layers, params


def split_head(model: torch.nn.Module, name: str, example: torch.Tensor) -> SplitModel:
    """Cut ``model`` at the submodule ``name``; check that ``head(backbone(x)) == model(x)``.

    Args:
        model: the (compressed) PyTorch model.
        name: dotted name of the head submodule (``head``, ``classifier.4``...).
        example: one input batch, to measure the feature size and check the split.

    Raises:
        RecipeError: no such submodule, unsupported layers, or a head that is not the last step.
    """
    import torch
    from torch import nn

    try:
        module = model.get_submodule(name)
    except AttributeError:
        known = [n for n, _ in model.named_modules() if n and n.count(".") < 2][:20]
        raise RecipeError(
            f"trainable_head.module: the model has no submodule '{name}'",
            hint=f"submodules: {', '.join(known)}",
        ) from None
    if not isinstance(module, nn.Linear | nn.Sequential):
        raise RecipeError(
            f"trainable_head.module '{name}' is a {type(module).__name__}", hint=_HINT
        )
    layers, params = _layers(module, name)
    backbone = copy.deepcopy(model).eval()
    parent_name, _, leaf = name.rpartition(".")
    parent = backbone.get_submodule(parent_name) if parent_name else backbone
    setattr(parent, leaf, nn.Identity())
    with torch.inference_mode():
        full = model.eval()(example)
        try:
            feats = backbone(example)
        except Exception as exc:  # what follows the head expected the head's output
            raise RecipeError(
                f"the model does not run with '{name}' removed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0]})",
                hint=_HINT,
            ) from None
    if not isinstance(feats, torch.Tensor) or not isinstance(full, torch.Tensor):
        raise RecipeError(
            "trainable_head needs a model with one tensor output",
            hint="wrap the model so it has one",
        )
    size = int(np.prod(feats.shape[1:]))
    if layers[0].in_features != size:
        raise RecipeError(
            f"trainable_head.module '{name}' takes {layers[0].in_features} inputs, but without it "
            f"the model outputs {size} values per sample",
            hint=_HINT,
        )
    head = Head.from_arrays(layers, params)
    got = head(feats.float().numpy())
    want = full.float().numpy().reshape(len(got), -1)
    scale = float(np.abs(want).max()) or 1.0
    if got.shape != want.shape or not np.allclose(got, want, atol=1e-4 * scale, rtol=1e-3):
        raise RecipeError(
            f"head(backbone(x)) differs from model(x) when cutting at '{name}': the head is not "
            "the last step of forward()",
            hint=_HINT,
        )
    return SplitModel(backbone, module, head, name)
