"""int8 for transformers (``quantize: {mode: transformer}``, or ``auto`` on attention models).

Transformer activations have outlier channels that one static int8 range per tensor cannot hold
(all-MiniLM-L6-v2, mean cosine to fp32 on held-out sentences: ONNX static QDQ 0.81-0.93, TFLite
full-integer 0.65). Each format's tool has its own answer, measured in docs/benchmarks.md:

- ONNX Runtime: dynamic int8 (``quantize_dynamic``): per-channel int8 weights of every MatMul
  with a constant weight (and int8 embedding tables), activations quantized per call from their
  actual range (0.993).
- OpenVINO: NNCF's static int8 with ``ModelType.TRANSFORMER`` (SmoothQuant): the ``openvino``
  quantizer in that mode (0.998).
- TFLite: dynamic-range int8 (ai-edge-quantizer ``dynamic_wi8_afp32``: int8 weights, activations
  quantized at run time), the converter's answer where full-integer int8 loses too much (0.998).

Both classes here follow the :class:`~edgesmith.compress.quantize.base.Quantizer` protocol, so the
accuracy-aware search keeps layers float exactly as for CNNs. They need no calibration.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.compress.quantize.base import Layer, ModuleNames, display_name
from edgesmith.compress.quantize.config import Scheme

__all__ = ["OnnxDynamicQuantizer", "TfliteDynamicQuantizer"]


class OnnxDynamicQuantizer:
    """ONNX Runtime dynamic int8 of the MatMuls with constant weights.

    Args:
        fp32_path: the exported float ``.onnx``.
        calibration: unused (dynamic int8 measures activation ranges at run time).
        scheme: per-channel or per-tensor weights (per-channel: 0.993 vs 0.960 mean cosine).
        work_dir: a private folder for the pre-processed model.
        names: maps exporter scopes to PyTorch module names (for the report).
        original: unused (the quantizers' common signature: where static int8's float layers
            take their uncorrected weights from).
    """

    format = "onnx"

    def __init__(
        self,
        fp32_path: Path,
        calibration: Any,
        scheme: Scheme,
        work_dir: Path,
        names: ModuleNames | None = None,
        original: Any = None,
    ) -> None:
        import onnx

        from edgesmith.compress.quantize.onnx import _module_of, preprocess

        self.scheme = scheme
        work_dir.mkdir(parents=True, exist_ok=True)
        # symbolic shape inference fails on dynamo exports of attention models
        self.source = preprocess(fp32_path, work_dir / "preprocessed.onnx", symbolic=False)
        model = onnx.load(str(self.source))
        exported = {n.name: _module_of(n) for n in onnx.load(str(fp32_path)).graph.node}
        inits = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
        names = names or ModuleNames()
        self.layers = [
            Layer(
                n.name,
                display_name(
                    names.resolve(_module_of(n) or exported.get(n.name)), n.op_type, n.name, True
                ),
                n.op_type,
                inits[n.input[1]],
            )
            for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits
        ]

    def quantize(self, path: Path, float_layers: Collection[str]) -> list[Path]:
        """Write the dynamic int8 model with ``float_layers`` (node names) left in float."""
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from edgesmith.compress.quantize.onnx import _ort_quiet

        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with _ort_quiet():
                quantize_dynamic(
                    str(self.source),
                    str(tmp),
                    per_channel=self.scheme.per_channel,
                    weight_type=QuantType.QInt8,
                    # the word-embedding table (Gather) too: most of a small encoder's bytes
                    op_types_to_quantize=["MatMul", "Gather"],
                    nodes_to_exclude=sorted(float_layers),
                    extra_options={"MatMulConstBOnly": True},
                )
            _strip_metadata(tmp)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return [path]


class TfliteDynamicQuantizer:
    """TFLite dynamic-range int8 with ai-edge-quantizer: int8 weights (per channel, symmetric),
    activations quantized at run time by the kernels.

    Args:
        fp32_path: the float ``.tflite``.
        calibration: unused.
        scheme: per-channel or per-tensor weights.
        work_dir: unused.
        names: maps litert-torch tensor names to PyTorch module names.
    """

    format = "tflite"

    def __init__(
        self,
        fp32_path: Path,
        calibration: Any,
        scheme: Scheme,
        work_dir: Path,
        names: ModuleNames | None = None,
        original: Any = None,
    ) -> None:
        from ai_edge_quantizer import qtyping

        from edgesmith.compress.quantize.tflite import _ops, list_layers, weight_config

        self.fp32_path = fp32_path
        ops, tensors, _, _ = _ops(fp32_path)
        self.layers = list_layers(ops, tensors, names or ModuleNames(), weighted_only=True)
        self._config = qtyping.OpQuantizationConfig(
            weight_tensor_config=weight_config(scheme.per_channel),
            compute_precision=qtyping.ComputePrecision.INTEGER,
            explicit_dequantize=False,
        )

    def quantize(self, path: Path, float_layers: Collection[str]) -> list[Path]:
        """Write the dynamic-range int8 ``.tflite`` with ``float_layers`` (op output tensor
        names) kept in float."""
        from ai_edge_quantizer import quantizer
        from ai_edge_quantizer.algorithm_manager import AlgorithmName

        from edgesmith.compress.quantize.tflite import _write
        from edgesmith.export._quiet import quiet

        qt = quantizer.Quantizer(str(self.fp32_path))
        qt.update_quantization_recipe(
            regex=".*",
            operation_name="*",
            op_config=self._config,
            algorithm_key=AlgorithmName.MIN_MAX_UNIFORM_QUANT,
        )
        for layer in sorted(float_layers):
            qt.update_quantization_recipe(
                regex=f"^{re.escape(layer)};$",
                operation_name="*",
                algorithm_key=AlgorithmName.NO_QUANTIZE,
            )
        with quiet():
            result = qt.quantize(enable_progress_report=False)
        _write(result, path)
        return [path]


def _strip_metadata(path: Path) -> None:
    """Drop the exporter's per-node metadata (module scopes, stack traces) from a quantized
    model; the report has already taken the layer names."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, str(path))
