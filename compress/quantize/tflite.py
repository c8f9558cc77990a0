"""TFLite int8 with ai-edge-quantizer: full-integer static quantization of the float ``.tflite``.

The float model is calibrated once (``Quantizer.calibrate``); each quantization with another set of
float layers reuses the calibration result and adds one ``NO_QUANTIZE`` rule per float layer
(matched on the op's output tensor name), so the converter inserts the (de)quantize ops around it.
Activations are int8 with a zero point (the TFLite int8 spec) unless the scheme asks for symmetric
ones; weights are symmetric, per channel.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.compress.quantize.base import (
    Layer,
    ModuleNames,
    check_method,
    display_name,
    feeds_for,
)
from edgesmith.compress.quantize.config import Scheme
from edgesmith.errors import EdgesmithError

__all__ = [
    "TfliteQuantizer",
    "list_layers",
    "signature_inputs",
    "to_fp16",
    "weight_config",
    "weight_only_int8",
]

WEIGHTED_OPS = (
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "FULLY_CONNECTED",
    "BATCH_MATMUL",
    "TRANSPOSE_CONV",
    "CONV_3D",
    "EMBEDDING_LOOKUP",
)
# ops that only move int8 data (or convert it): never worth keeping float on their own
TRANSPARENT_OPS = (
    "RESHAPE", "TRANSPOSE", "PAD", "PADV2", "MAX_POOL_2D", "SQUEEZE", "STRIDED_SLICE", "SLICE",
    "GATHER", "SPLIT", "PACK", "UNPACK", "BROADCAST_TO", "DEQUANTIZE", "QUANTIZE", "RELU",
    "RELU6", "RELU_N1_TO_1", "CONCATENATION", "DELEGATE",
)  # fmt: skip
_METHODS = {"minmax": "min_max_uniform_quantize", "mse": "MSE"}


def _ops(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str, str]:
    """Ops and tensors of a ``.tflite`` (without delegates), its signature key and input name."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interp.allocate_tensors()
    sigs = interp.get_signature_list()
    key = next(iter(sigs)) if sigs else "serving_default"
    inputs = sigs.get(key, {}).get("inputs") or ["args_0"]
    return interp._get_ops_details(), interp.get_tensor_details(), key, inputs[0]


def list_layers(
    ops: list[dict[str, Any]],
    tensors: list[dict[str, Any]],
    names: ModuleNames,
    weighted_only: bool = False,
) -> list[Layer]:
    """The quantizable float ops of a ``.tflite`` (``_ops``), named after their PyTorch modules;
    ``weighted_only``: only ops with a weight tensor (what dynamic-range int8 quantizes)."""
    layers = []
    for op in ops:
        if op["op_name"] in TRANSPARENT_OPS or not len(op["outputs"]):
            continue
        if tensors[op["outputs"][0]]["dtype"] != np.float32:
            continue
        out = tensors[op["outputs"][0]]["name"]
        weighted = op["op_name"] in WEIGHTED_OPS
        weight = (
            tensors[op["inputs"][1]]
            if weighted and len(op["inputs"]) > 1 and op["inputs"][1] >= 0
            else None
        )
        # BATCH_MATMUL multiplies two activations (attention) in litert-torch's graphs
        if weighted_only and (weight is None or op["op_name"] == "BATCH_MATMUL"):
            continue
        params = int(np.prod(weight["shape"])) if weight is not None else 0
        module = names.from_tflite(weight["name"] if weight is not None else out)
        label = display_name(module or names.from_tflite(out), op["op_name"], out, weighted)
        layers.append(Layer(out, label, op["op_name"], params))
    return layers


def signature_inputs(path: Path, key: str) -> list[tuple[str, list[int], Any]]:
    """``(name, shape, numpy dtype)`` of the inputs of signature ``key`` of a ``.tflite``."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    details = interp.get_signature_runner(key).get_input_details()
    return [(name, [int(v) for v in d["shape"]], d["dtype"]) for name, d in details.items()]


def weight_config(per_channel: bool) -> Any:
    """ai-edge-quantizer's int8 weights: symmetric, per output channel or per tensor."""
    from ai_edge_quantizer import qtyping

    return qtyping.TensorQuantizationConfig(
        num_bits=8,
        symmetric=True,
        granularity=qtyping.QuantGranularity.CHANNELWISE
        if per_channel
        else qtyping.QuantGranularity.TENSORWISE,
    )


def _write(result: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        result.export_model(str(tmp), overwrite=True)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class TfliteQuantizer:
    """Full-integer int8 for LiteRT with ai-edge-quantizer, calibrated once.

    Args:
        fp32_path: the float ``.tflite``.
        calibration: calibration inputs, samples first (run one at a time: the model has batch 1).
        scheme: per-channel or per-tensor weights; symmetric or asymmetric int8 activations.
        work_dir: unused.
        names: maps litert-torch tensor names to PyTorch module names.
        original: returns the model whose weights and biases an op kept in float gets back (the
            model before bias correction, see ``quantize/ptq.py``: same graph); None keeps
            ``fp32_path``'s.

    Activation ranges are the global min/max over the calibration samples (ai-edge-quantizer's
    default, a moving average of per-sample ranges, clips the rare large activations that
    matter: 0.78 -> 0.90 top-1 agreement on EfficientNet-Lite0, docs/benchmarks.md).
    """

    format = "tflite"

    def __init__(
        self,
        fp32_path: Path,
        calibration: np.ndarray,
        scheme: Scheme,
        work_dir: Path,
        names: ModuleNames | None = None,
        *,
        original: Callable[[], Path] | None = None,
    ) -> None:
        from ai_edge_quantizer import qtyping

        check_method(scheme.method, "tflite", _METHODS)
        self.fp32_path = fp32_path
        self.scheme = scheme
        self._original = original
        self._models: tuple[Any, Any] | None = None
        ops, tensors, self.signature, _ = _ops(fp32_path)
        self.layers = list_layers(ops, tensors, names or ModuleNames())
        self._config = qtyping.OpQuantizationConfig(
            activation_tensor_config=qtyping.TensorQuantizationConfig(
                num_bits=8, symmetric=scheme.activations_symmetric
            ),
            weight_tensor_config=weight_config(scheme.per_channel),
            compute_precision=qtyping.ComputePrecision.INTEGER,
            explicit_dequantize=False,
        )
        from edgesmith.export._quiet import quiet
        from edgesmith.progress import is_quiet

        # one sample at a time (batch 1), each input in the file's dtype and fixed size
        samples = feeds_for(calibration, signature_inputs(fp32_path, self.signature), batch=1)
        qt = self._quantizer()
        # ai-edge-quantizer shows its own calibration progress bar; silenced only with --quiet
        with quiet() if is_quiet() else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "preserve_all_tensors is for debugging": it is
            self._calibration = _calibrate(qt, fp32_path, {self.signature: samples})
        if not self._calibration:
            raise EdgesmithError(
                "ai-edge-quantizer collected no calibration statistics",
                hint="check that the calibration samples match the model input",
            )

    def _quantizer(self, float_layers: Collection[str] = ()) -> Any:
        from ai_edge_quantizer import quantizer
        from ai_edge_quantizer.algorithm_manager import AlgorithmName

        source = self._source(float_layers) if float_layers and self._original else None
        qt = quantizer.Quantizer(source if source is not None else str(self.fp32_path))
        qt.update_quantization_recipe(
            regex=".*",
            operation_name="*",
            op_config=self._config,
            algorithm_key=_METHODS[self.scheme.method],
        )
        for layer in sorted(float_layers):
            qt.update_quantization_recipe(
                regex=f"^{re.escape(layer)};$",
                operation_name="*",
                algorithm_key=AlgorithmName.NO_QUANTIZE,
            )
        return qt

    def _source(self, float_layers: Collection[str]) -> bytearray | None:
        """The float model with the original weights and biases of the ops in ``float_layers``."""
        from ai_edge_litert.tools import flatbuffer_utils

        if self._models is None:
            assert self._original is not None
            self._models = (
                flatbuffer_utils.read_model(str(self.fp32_path)),
                flatbuffer_utils.read_model(str(self._original())),
            )
        model, original = self._models
        if len(model.subgraphs) != len(original.subgraphs):
            return None
        saved: list[tuple[Any, Any]] = []
        wanted = set(float_layers)
        for sg, osg in zip(model.subgraphs, original.subgraphs, strict=True):
            if len(sg.operators) != len(osg.operators):
                return None
            for op, oop in zip(sg.operators, osg.operators, strict=True):
                if not len(op.outputs) or sg.tensors[op.outputs[0]].name.decode() not in wanted:
                    continue
                for i, oi in zip(op.inputs[1:], oop.inputs[1:], strict=False):
                    if i < 0 or oi < 0:
                        continue
                    buf = model.buffers[sg.tensors[i].buffer]
                    obuf = original.buffers[osg.tensors[oi].buffer]
                    if (
                        buf.data is not None
                        and obuf.data is not None
                        and len(buf.data) == len(obuf.data)
                    ):
                        saved.append((buf, buf.data))
                        buf.data = obuf.data
        try:
            return flatbuffer_utils.convert_object_to_bytearray(model)
        finally:
            for buf, data in saved:
                buf.data = data

    def quantize(self, path: Path, float_layers: Collection[str]) -> list[Path]:
        """Write the int8 ``.tflite`` with ``float_layers`` (op output tensor names) kept in float."""
        from edgesmith.export._quiet import quiet

        with quiet():
            result = self._quantizer(float_layers).quantize(
                self._calibration, enable_progress_report=False
            )
        _write(result, path)
        return [path]


def _calibrate(qt: Any, path: Path, data: dict[str, Any]) -> Any:
    """Activation ranges: the global min/max over every sample (``qsv_utils.min_max_update``)."""
    from ai_edge_quantizer import calibrator
    from ai_edge_quantizer.utils import qsv_utils

    recipes = getattr(qt, "_recipe_manager", None)  # ai-edge-quantizer 0.10; else its default
    if recipes is None:
        return qt.calibrate(data)
    cb = calibrator.Calibrator(
        str(path), num_threads=os.cpu_count() or 1, qsv_update_func=qsv_utils.min_max_update
    )
    cb.calibrate(data, recipes)
    return cb.get_model_qsvs()


def to_fp16(fp32_path: Path, path: Path) -> list[Path]:
    """Float16 weights (TFLite's "float16 quantization"); float32 compute and I/O."""
    from ai_edge_quantizer import qtyping, quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    from edgesmith.export._quiet import quiet

    qt = quantizer.Quantizer(str(fp32_path))
    qt.update_quantization_recipe(
        regex=".*",
        operation_name="*",
        op_config=qtyping.OpQuantizationConfig(
            weight_tensor_config=qtyping.TensorQuantizationConfig(
                num_bits=16, dtype=qtyping.TensorDataType.FLOAT
            ),
            compute_precision=qtyping.ComputePrecision.FLOAT,
            explicit_dequantize=True,
        ),
        algorithm_key=AlgorithmName.FLOAT_CASTING,
    )
    with quiet():
        result = qt.quantize(enable_progress_report=False)
    _write(result, path)
    return [path]


def weight_only_int8(fp32_path: Path, path: Path) -> list[Path]:
    """Int8 weights (symmetric, per channel) dequantized in the graph; float compute."""
    from ai_edge_quantizer import quantizer, recipe

    from edgesmith.export._quiet import quiet

    qt = quantizer.Quantizer(str(fp32_path), recipe.weight_only_wi8_afp32())
    with quiet():
        result = qt.quantize(enable_progress_report=False)
    _write(result, path)
    return [path]
