"""Safe model loading: factory plus weights, or a ``.pt2`` ExportedProgram. Never a full unpickle.

Weights come from ``.safetensors``, from a state dict read with ``torch.load(weights_only=True)``
(which refuses arbitrary Python objects), or from a ``torch.export`` archive that
:mod:`edgesmith.pt2` screens member by member before torch reads it.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgesmith.errors import ModelLoadError
from edgesmith.pt2 import UNSAFE_HINT, load_exported_program
from edgesmith.refs import resolve_ref

if TYPE_CHECKING:
    import torch

    from edgesmith.recipe import ModelConfig

__all__ = [
    "build_model",
    "check_signature",
    "load_exported_program",
    "load_state_dict",
    "load_weights_",
    "resolve_outputs",
]

_UNSAFE_HINT = UNSAFE_HINT


def _torch_load_safe(data: bytes | Path, source: str) -> Any:
    import pickle

    import torch

    try:
        return torch.load(
            io.BytesIO(data) if isinstance(data, bytes) else data,
            map_location="cpu",
            weights_only=True,
        )
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "disallowed content"
        if (
            "Weights only load failed" in first
            or "Unsupported global" in str(exc)
            or "GLOBAL" in str(exc)
        ):
            first = "it contains Python objects other than tensors"
        raise ModelLoadError(f"refused to load {source}: {first}", hint=_UNSAFE_HINT) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot read {source}: {msg}", hint="is the file complete? re-download or re-save it"
        ) from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file, without unpickling objects.

    A checkpoint dict that holds the state dict under ``state_dict`` or ``model`` is unwrapped, and
    a ``module.`` prefix left by DistributedDataParallel is stripped.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(
            f"weights file not found: {path}",
            hint="paths in a recipe are relative to the recipe's folder",
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot read {path}: {exc}", hint="is the file complete? re-download or re-save it"
            ) from None
    elif path.suffix == ".pt2":
        raise ModelLoadError(
            f"{path} is an ExportedProgram, not a state dict",
            hint="name it as 'weights' with no 'factory' to load the program itself",
        )
    else:
        sd = _torch_load_safe(path, str(path))
        if isinstance(sd, dict):
            for key in ("state_dict", "model", "model_state_dict"):
                if isinstance(sd.get(key), dict):
                    sd = sd[key]
                    break
    if not isinstance(sd, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise ModelLoadError(
            f"{path} does not hold a state dict (a mapping of names to tensors)", hint=_UNSAFE_HINT
        )
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_weights_(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "weights"
) -> torch.nn.Module:
    """Load ``state_dict`` into ``model`` in place; mismatches are listed by name."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shape:
        problems.append(f"shape mismatch: {_names(shape, 4)}")
    if problems:
        raise ModelLoadError(
            f"{source} do not match the model: " + "; ".join(problems),
            hint="check the factory and its kwargs match the weights (width, number of classes)",
        )
    model.load_state_dict(state_dict, strict=True)
    return model


def build_model(config: ModelConfig) -> torch.nn.Module:
    """Instantiate the recipe's model with its weights, in eval mode."""
    import torch

    if config.factory is None:
        assert config.weights is not None  # guaranteed by the recipe schema
        return load_exported_program(config.weights)
    factory = resolve_ref(config.factory, what="model factory", error=ModelLoadError)
    try:
        model = factory(**config.kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"model factory '{config.factory}' raised {type(exc).__name__}: {exc}",
            hint="check 'model.kwargs' in the recipe; run with --debug for the traceback",
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(
            f"model factory '{config.factory}' returned {type(model).__name__}, not a torch.nn.Module",
            hint="the factory must return an nn.Module",
        )
    if config.weights:
        state = load_state_dict(config.weights)
        # pruned weights (edgesmith prune) carry their layer widths: resize the model first
        from edgesmith.compress.pruning.structure import apply_structure_, read_structure

        structure = read_structure(config.weights)
        if structure is not None:
            apply_structure_(model, structure, state)
        load_weights_(model, state, source=Path(config.weights).name)
    return model.eval()


def check_signature(model: Any, names: list[str], named: bool) -> None:
    """The model's ``forward`` takes the declared inputs: as many (positional, in order) and, when
    the recipe names them (``model.inputs``), under those names.

    Raises:
        RecipeError: naming the input and the fix; nothing is checked for ``forward(*args)``
            (ExportedPrograms, wrappers).
    """
    import inspect

    from edgesmith.errors import RecipeError

    forward = getattr(model, "forward", None)
    try:
        params = list(inspect.signature(forward).parameters.values()) if forward else []
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return
    positional = [
        p
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    where = f"{type(model).__name__}.forward({', '.join(p.name for p in positional)})"
    if len(names) > len(positional):
        extra = names[len(positional) :]
        raise RecipeError(
            f"the recipe declares {len(names)} inputs ({', '.join(names)}) but {where} takes "
            f"{len(positional)}: no argument for {', '.join(repr(n) for n in extra)}",
            hint="remove the extra entries from model.inputs, or give forward() those arguments",
        )
    if len(names) < len(required):
        missing = [p.name for p in required[len(names) :]]
        raise RecipeError(
            f"{where} needs {', '.join(repr(m) for m in missing)}, which model.inputs does not "
            "declare",
            hint=f"add {{name: {missing[0]}, shape: [...], dtype: ...}} to model.inputs, in "
            "forward's order",
        )
    if named:
        for i, (name, p) in enumerate(zip(names, positional, strict=False)):
            if name != p.name:
                raise RecipeError(
                    f"model.inputs[{i}] is named '{name}' but argument {i + 1} of {where} is "
                    f"'{p.name}'",
                    hint=f"rename model.inputs[{i}] to '{p.name}' (inputs are fed in forward's "
                    "order, by name)",
                )


def resolve_outputs(
    declared: list[Any] | None, returned: Any, metric: str
) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """Names and kinds of the model's outputs, from the recipe or inferred from one forward pass.

    Undeclared outputs are ``logits`` under a top-1/top-5 metric; under a custom metric, one
    value per sample is ``regression``, a single wider output ``logits`` (as before outputs
    could be declared: a classifier's recipe keeps its checks) and several wider outputs
    ``features`` (never argmax-judged). The note says so and how to declare them.

    Returns:
        ``(names, kinds, note)``; ``note`` says what was inferred (empty when declared).

    Raises:
        RecipeError: the model returns another number of outputs than declared, or a built-in
            metric meets several outputs.
    """
    from edgesmith.errors import RecipeError

    outs = list(returned) if isinstance(returned, tuple | list) else [returned]
    if declared:
        if len(declared) != len(outs):
            raise RecipeError(
                f"model.outputs declares {len(declared)} output(s) "
                f"({', '.join(o.name for o in declared)}) but forward returns {len(outs)}",
                hint="declare one entry per returned tensor, in order",
            )
        names = tuple(o.name for o in declared)
        kinds = tuple(o.kind for o in declared)
        note = ""
    else:
        names = ("output",) if len(outs) == 1 else tuple(f"output_{i}" for i in range(len(outs)))
        if metric in ("top1", "top5"):
            kinds = ("logits",) * len(outs)
        else:
            # one value per sample: a regression; one wider output: class scores, as before
            # multi-output models (a recipe written for a classifier keeps its parity check);
            # several wider outputs: features (never argmax-judged)
            kinds = tuple(
                "regression"
                if int(getattr(o, "numel", lambda: 0)()) <= max(1, len(o))
                else "logits"
                if len(outs) == 1
                else "features"
                for o in outs
            )
        note = (
            ""
            if metric in ("top1", "top5")
            else "model.outputs not declared: judging "
            + ", ".join(f"'{n}' as {k}" for n, k in zip(names, kinds, strict=True))
            + " (declare model.outputs: [{name, kind: logits|embedding|features|regression}])"
        )
    if metric in ("top1", "top5") and len(outs) > 1:
        raise RecipeError(
            f"metric '{metric}' scores one output, but the model returns {len(outs)} "
            f"({', '.join(names)})",
            hint="give a 'module:function' metric taking (outputs: a dict by output name, targets)",
        )
    return names, kinds, note
