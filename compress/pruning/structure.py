"""Save and reload pruned models as plain safetensors weights.

A pruned model is its original architecture with smaller layers. Its ``.safetensors`` file holds
the weights plus, in the file's metadata (``edgesmith.structure``), the shape-defining attributes
of every layer (channels, features, hidden size, heads). Loading builds the model from its factory
as usual, resizes the layers named there, and loads the weights: no pickled module, no retracing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgesmith.errors import ModelLoadError

__all__ = [
    "STRUCTURE_KEY",
    "apply_structure_",
    "describe_structure",
    "read_structure",
    "save_model",
]

STRUCTURE_KEY = "edgesmith.structure"
_VERSION = 1

# the attributes that define a layer's shapes, by type (checked in order; subclasses included)
_ATTRS: list[tuple[type[nn.Module], tuple[str, ...]]] = [
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.batchnorm._NormBase, ("num_features",)),
    (nn.LayerNorm, ("normalized_shape",)),
    (nn.GroupNorm, ("num_groups", "num_channels")),
    (nn.RNNBase, ("input_size", "hidden_size")),
    (nn.Embedding, ("num_embeddings", "embedding_dim")),
    (nn.PReLU, ("num_parameters",)),
    (nn.MultiheadAttention, ("embed_dim", "num_heads", "head_dim", "kdim", "vdim")),
]


def _attrs_of(module: nn.Module) -> tuple[str, ...]:
    from edgesmith.compress.pruning.attention import PrunableAttention

    if isinstance(module, PrunableAttention):
        return ("embed_dim", "num_heads", "head_dim")
    # Hugging Face BERT-family self-attention (attention.AttentionHeads): its head count
    if isinstance(getattr(module, "query", None), nn.Linear) and all(
        isinstance(getattr(module, a, None), int)
        for a in ("num_attention_heads", "attention_head_size", "all_head_size")
    ):
        return ("num_attention_heads", "all_head_size")
    for cls, attrs in _ATTRS:
        if isinstance(module, cls):
            return attrs
    return ()


def describe_structure(model: nn.Module) -> dict[str, Any]:
    """The shape-defining attributes of every layer of ``model`` (JSON-serialisable)."""
    modules: dict[str, Any] = {}
    for name, module in model.named_modules():
        attrs = _attrs_of(module)
        if not attrs:
            continue
        entry: dict[str, Any] = {"type": type(module).__name__}
        for a in attrs:
            v = getattr(module, a)
            entry[a] = list(v) if isinstance(v, tuple) else v
        modules[name] = entry
    return {"version": _VERSION, "modules": modules}


def save_model(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s weights and structure to a ``.safetensors`` file, atomically."""
    from safetensors.torch import save

    from edgesmith.fsutil import atomic_write_bytes

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {STRUCTURE_KEY: json.dumps(describe_structure(model), separators=(",", ":"))}
    meta.update(metadata or {})
    atomic_write_bytes(path, save(state, metadata=meta))
    return path


def read_structure(path: str | Path) -> dict[str, Any] | None:
    """The structure stored in a ``.safetensors`` file, or None if it holds plain weights."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}", hint="is the file complete?") from None
    raw = meta.get(STRUCTURE_KEY)
    if raw is None:
        return None
    malformed = ModelLoadError(
        f"{path}: malformed '{STRUCTURE_KEY}' metadata", hint="re-save it with edgesmith prune"
    )
    try:
        structure = json.loads(raw)
    except (ValueError, RecursionError):
        raise malformed from None
    if not isinstance(structure, dict) or structure.get("version") != _VERSION:
        raise ModelLoadError(
            f"{path}: unsupported structure version {structure.get('version') if isinstance(structure, dict) else '?'}",
            hint="re-save it with this edgesmith version",
        )
    # layer name -> {"type": class name, attribute: int, None or list of ints}; nothing else
    modules = structure.get("modules", {})
    if not isinstance(modules, dict) or not all(
        isinstance(name, str)
        and isinstance(entry, dict)
        and isinstance(entry.get("type"), str)
        and all(_is_shape_value(v) for k, v in entry.items() if k != "type")
        for name, entry in modules.items()
    ):
        raise malformed
    return structure


def _is_shape_value(v: Any) -> bool:
    if isinstance(v, list):
        return all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    return v is None or (isinstance(v, int) and not isinstance(v, bool))


def apply_structure_(
    model: nn.Module, structure: dict[str, Any], state_dict: dict[str, torch.Tensor]
) -> nn.Module:
    """Resize ``model``'s layers in place to the recorded structure and the weights' shapes.

    Raises:
        ModelLoadError: the structure names layers the model does not have, or of another type.
    """
    from edgesmith.compress.pruning.attention import convert_attention_

    entries: dict[str, Any] = structure.get("modules", {})
    named = dict(model.named_modules())
    to_convert = [
        named[n]
        for n, e in entries.items()
        if e.get("type") == "PrunableAttention" and isinstance(named.get(n), nn.MultiheadAttention)
    ]
    if to_convert:
        skip = [
            m
            for m in named.values()
            if isinstance(m, nn.MultiheadAttention) and m not in to_convert
        ]
        convert_attention_(model, skip=skip)
        named = dict(model.named_modules())
    for name, entry in entries.items():
        module = named.get(name)
        if module is None or type(module).__name__ != entry.get("type"):
            found = type(module).__name__ if module is not None else "nothing"
            raise ModelLoadError(
                f"the pruned weights describe layer '{name}' as {entry.get('type')}, but the model has {found} there",
                hint="load pruned weights with the factory (and kwargs) of the model that was pruned",
            )
        for attr, value in entry.items():
            if attr == "type":
                continue
            if attr not in _attrs_of(module):  # only the shape-defining attributes, never others
                raise ModelLoadError(
                    f"the pruned weights set '{attr}' of layer '{name}', which is not one of its "
                    f"shape attributes ({', '.join(_attrs_of(module))})",
                    hint="re-save the pruned model with edgesmith prune",
                )
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    _resize_tensors_(model, state_dict)
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()
    return model


def _resize_tensors_(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Replace parameters and buffers whose shape differs from the weights by empty ones."""
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, param in list(module._parameters.items()):
            ref = state_dict.get(prefix + pname)
            if param is not None and ref is not None and ref.shape != param.shape:
                module._parameters[pname] = nn.Parameter(
                    torch.empty(ref.shape, dtype=param.dtype), requires_grad=param.requires_grad
                )
        for bname, buf in list(module._buffers.items()):
            ref = state_dict.get(prefix + bname)
            if buf is not None and ref is not None and ref.shape != buf.shape:
                module._buffers[bname] = torch.empty(ref.shape, dtype=buf.dtype)
