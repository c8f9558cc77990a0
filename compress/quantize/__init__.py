"""The ``quantize`` stage: int8 (and fp16/bf16/weight-only) variants of every exported format.

The stage itself only checks its inputs and registers an artifact hook; the pipeline calls the
hook with each fp32 artifact it exports, and the hook derives the variants with that format's own
tool (onnxruntime.quantization, NNCF, ai-edge-quantizer), searches for the fewest float layers
within ``max_accuracy_drop`` and evaluates the results like any other artifact.

This module stays import-light (``edgesmith recipe check`` validates options without torch).

Example (recipe)::

    stages:
      - quantize: {scheme: int8, max_accuracy_drop: 0.005}
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgesmith.compress.base import Stage, StageResult, register_stage
from edgesmith.compress.quantize.config import PRECISIONS, QuantizeConfig, Scheme, resolve_scheme

if TYPE_CHECKING:
    from edgesmith.compress.base import Context

__all__ = [
    "ARCH_MISSING_VARIANTS",
    "DYNAMIC_QUANTIZERS",
    "PRECISIONS",
    "QUANTIZERS",
    "TRANSFORMER_QUANTIZERS",
    "VARIANTS",
    "Quantize",
    "QuantizeConfig",
    "Scheme",
    "resolve_scheme",
]

# format -> "module:class" of its int8 quantizer (see base.Quantizer)
QUANTIZERS: dict[str, str] = {
    "onnx": "edgesmith.compress.quantize.onnx:OnnxQuantizer",
    "openvino": "edgesmith.compress.quantize.openvino:OpenVinoQuantizer",
    "tflite": "edgesmith.compress.quantize.tflite:TfliteQuantizer",
}

# the int8 quantizers of mode "transformer" (QuantizeConfig.mode): what each tool recommends for
# transformers; OpenVINO's is NNCF's with ModelType.TRANSFORMER (SmoothQuant)
TRANSFORMER_QUANTIZERS: dict[str, str] = {
    "onnx": "edgesmith.compress.quantize.transformer:OnnxDynamicQuantizer",
    "openvino": "edgesmith.compress.quantize.openvino:OpenVinoQuantizer",
    "tflite": "edgesmith.compress.quantize.transformer:TfliteDynamicQuantizer",
}
# mode "dynamic": int8 weights, activations quantized at run time where the format can (ONNX,
# TFLite); OpenVINO, which cannot on CPU, keeps its static int8. For models whose float inputs or
# activations have ranges one static int8 scale cannot hold (raw tabular features)
DYNAMIC_QUANTIZERS: dict[str, str] = {
    "onnx": "edgesmith.compress.quantize.transformer:OnnxDynamicQuantizer",
    "openvino": "edgesmith.compress.quantize.openvino:OpenVinoQuantizer",
    "tflite": "edgesmith.compress.quantize.transformer:TfliteDynamicQuantizer",
}

# (format, precision) -> "module:function(fp32_path, path) -> files"; a missing pair is skipped
VARIANTS: dict[tuple[str, str], str] = {
    ("onnx", "fp16"): "edgesmith.compress.quantize.onnx:to_fp16",
    ("onnx", "w8"): "edgesmith.compress.quantize.onnx:weight_only_int8",
    ("openvino", "fp16"): "edgesmith.compress.quantize.openvino:to_fp16",
    ("openvino", "bf16"): "edgesmith.compress.quantize.openvino:to_bf16",
    ("openvino", "w8"): "edgesmith.compress.quantize.openvino:weight_only_int8",
    ("tflite", "fp16"): "edgesmith.compress.quantize.tflite:to_fp16",
    ("tflite", "w8"): "edgesmith.compress.quantize.tflite:weight_only_int8",
}

# why a format has no variant of a precision (shown in the report instead of an artifact)
MISSING_VARIANTS: dict[tuple[str, str], str] = {
    ("onnx", "bf16"): "onnxruntime has no bf16 kernels for CPUs; use openvino for bf16",
    ("tflite", "bf16"): "TFLite has no bf16 tensors; use fp16",
}

# (format, precision, target arch) -> why a build for that architecture leaves the variant out:
# the device would not run it at the promised precision
ARCH_MISSING_VARIANTS: dict[tuple[str, str, str], str] = {
    ("openvino", "int8", "aarch64"): (
        "OpenVINO's CPU plugin on 64-bit Arm runs int8 convolutions with fp32 kernels, so an Arm "
        "device would not run it at int8 (benchmarks/arm64_emulated.py); use the onnx or tflite "
        "int8 artifact on Arm"
    ),
}


@register_stage
class Quantize(Stage):
    """Post-training quantization of every exported format (see ``QuantizeConfig``)."""

    name = "quantize"
    config_cls = QuantizeConfig

    def run(self, ctx: Context) -> StageResult:
        from edgesmith.compress.quantize.hook import install

        assert isinstance(self.config, QuantizeConfig)
        _, quantization = install(ctx, self.config)
        return StageResult({"quantization": quantization})
