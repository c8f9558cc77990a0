"""The int8 recipes by model kind (``quantize: {mode}``) and what the build says about them.

``static`` (the default for CNNs) calibrates activation ranges; ``transformer`` (``auto`` for
models with attention and no convolution) uses what each format's tool recommends for
transformers; ``dynamic`` quantizes weights and lets ONNX Runtime and TFLite quantize activations
at run time (raw tabular features). The quantizers are in ``QUANTIZERS``,
``TRANSFORMER_QUANTIZERS`` and ``DYNAMIC_QUANTIZERS`` (``compress/quantize/__init__.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgesmith.compress.base import Context

__all__ = [
    "DYNAMIC_RECIPES",
    "TRANSFORMER_RECIPES",
    "TRANSFORMER_RECIPES_TEXT",
    "agreement_text",
    "detect_mode",
    "input_layouts",
    "int8_recipe",
    "mode_note",
    "ptq_array",
    "ptq_skip_reason",
]

# what mode "transformer" does per format (shown to the user and written into the report)
TRANSFORMER_RECIPES = {
    "onnx": "onnxruntime dynamic int8: per-channel int8 weights, activations quantized at run time",
    "openvino": "NNCF static int8 with ModelType.TRANSFORMER (SmoothQuant)",
    "tflite": (
        "dynamic-range int8 (int8 weights, activations quantized at run time): full-integer int8 "
        "of transformers loses too much (all-MiniLM-L6-v2: mean cosine 0.65)"
    ),
}
TRANSFORMER_RECIPES_TEXT = "onnx dynamic, openvino SmoothQuant, tflite dynamic-range"
DYNAMIC_RECIPES = {
    "onnx": TRANSFORMER_RECIPES["onnx"],
    "openvino": "NNCF static int8 (OpenVINO has no run-time activation int8 on CPU)",
    "tflite": "dynamic-range int8 (int8 weights, activations quantized at run time)",
}


def int8_recipe(mode: str, fmt: str) -> str:
    """What ``mode`` does for ``fmt`` (empty for ``static``: the calibrated default)."""
    table = {"transformer": TRANSFORMER_RECIPES, "dynamic": DYNAMIC_RECIPES}.get(mode, {})
    return table.get(fmt, "")


def detect_mode(model: Any) -> str:
    """``transformer`` for a model with attention and no convolution (a text or sequence encoder,
    whose activations have the outlier channels static int8 cannot represent), else ``static``."""
    from torch import nn

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    attention = conv = False
    for mod in model.modules():
        conv = conv or isinstance(mod, convs)
        name = type(mod).__name__
        attention = (
            attention
            or isinstance(mod, nn.MultiheadAttention)
            or name.endswith(("Attention", "SelfAttention"))
        )
    return "transformer" if attention and not conv else "static"


def input_layouts(ctx: Context) -> list[Any]:
    """The model's inputs; a context made without them (third-party callers) has one input of
    the example's shape."""
    if ctx.layouts:
        return list(ctx.layouts)
    from edgesmith.feeds import InputLayout

    args = ctx.example_args
    return [
        InputLayout(
            "input" if len(args) == 1 else f"input_{i}",
            str(x.dtype).removeprefix("torch."),
            ("batch", *x.shape[1:]),
        )
        for i, x in enumerate(args)
    ]


def agreement_text(parity: Any) -> str:
    """The first output's agreement, named by its kind (top-1 agreement only for logits)."""
    first = parity.outputs[0] if parity.outputs else None
    if first is None or first.kind == "logits":
        return f"top-1 agreement {parity.agreement:.4f}"
    if first.kind in ("embedding", "features"):
        return f"mean cosine {first.measured.get('mean_cosine', 0.0):.4f}"
    return f"relative L2 {first.measured.get('rel_l2', 0.0):.3g}"


def mode_note(mode: str) -> str:
    """What the stage's echo line adds for ``mode`` (empty for ``static``)."""
    if mode == "transformer":
        return f"; int8 recipe: transformer ({TRANSFORMER_RECIPES_TEXT})"
    if mode == "dynamic":
        return "; int8 recipe: dynamic (onnx, tflite: dynamic int8; openvino: static)"
    return ""


def ptq_array(calibration: Any) -> Any:
    """The calibration inputs as the one float array PyTorch-side int8 preparation (bias
    correction) takes: a one-input model of fixed size (``calibration``: ``Samples`` or an array)."""
    from edgesmith.feeds import Samples

    samples = Samples.of(calibration)
    return samples.columns[0]


def ptq_skip_reason(mode: str, calibration: Any) -> str:
    """Why PyTorch-side int8 preparation (bias correction) does not apply, or "" when it does:
    only static int8 calibrates activations, and it takes one float input of fixed size."""
    from edgesmith.feeds import Samples

    if mode != "static":
        return f"int8 mode '{mode}': weights are quantized by the format's own recipe"
    samples = Samples.of(calibration)
    if len(samples.columns) != 1 or samples.ragged:
        return "the model has several inputs or inputs of varying size"
    if samples.columns[0].dtype.kind != "f":
        return f"the model's input is {samples.columns[0].dtype}, not float"
    return ""
