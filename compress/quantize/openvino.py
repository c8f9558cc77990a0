"""OpenVINO int8 with NNCF: ``nncf.quantize`` on the IR, once; float layers by reverting quantizers.

NNCF inserts FakeQuantize operations on the inputs of every quantizable operation and corrects
biases. Keeping a layer in float removes the FakeQuantize operations in front of it and restores
its original weights and bias, as NNCF's own accuracy-control algorithm does, so a search over
float layers needs one calibration, not one per candidate.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Collection, Iterator
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

__all__ = [
    "OpenVinoQuantizer",
    "advanced_parameters",
    "to_bf16",
    "to_fp16",
    "weight_only_int8",
]

log = logging.getLogger(__name__)

WEIGHTED_OPS = (
    "Convolution",
    "GroupConvolution",
    "ConvolutionBackpropData",
    "GroupConvolutionBackpropData",
    "MatMul",
)
_METHODS = ("minmax", "percentile")
# ops that move int8 data without changing it: NNCF quantizes in front of them
_AGNOSTIC = (
    "MaxPool",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "StridedSlice",
    "Slice",
    "Pad",
)
_NOT_LAYERS = ("FakeQuantize", "Constant", "Convert", "Parameter", "Result", "ShapeOf")
_MODULE = re.compile(r"^__module\.([^/]+)/")


@contextlib.contextmanager
def _nncf_quiet() -> Iterator[None]:
    from edgesmith.progress import is_quiet

    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        if is_quiet():
            from edgesmith.export._quiet import quiet

            with quiet():
                yield
        else:
            yield
    finally:
        logger.setLevel(level)


def _module_of(op: Any, depth: int = 2) -> str | None:
    """The PyTorch module in an op's friendly name, or in its consumers' (fused ops lose theirs)."""
    m = _MODULE.match(op.get_friendly_name())
    if m:
        return m.group(1)
    if depth == 0:
        return None
    for out in op.outputs():
        for target in out.get_target_inputs():
            found = _module_of(target.get_node(), depth - 1)
            if found:
                return found
    return None


def _const_source(port: Any) -> Any | None:
    node = port.get_source_output().get_node()
    while node.get_type_name() in ("Convert", "Reshape", "Unsqueeze") and node.inputs():
        node = node.input_value(0).get_node()
    return node if node.get_type_name() == "Constant" else None


def _fq_edge(port: Any) -> tuple[Any, Any] | None:
    """The FakeQuantize feeding ``port`` directly or through data-movement ops with one consumer.

    Returns the input port to rewire (``port`` or one up the chain) and the FakeQuantize node.
    """
    for _ in range(6):
        node = port.get_source_output().get_node()
        kind = node.get_type_name()
        if kind == "FakeQuantize":
            return port, node
        if kind not in _AGNOSTIC or len(node.output(0).get_target_inputs()) != 1:
            return None
        port = node.input(0)
    return None


def _quantized_const(port: Any) -> bool:
    """Whether ``port`` is fed by an int8/uint8/int4 constant through a dequantizing subgraph."""
    frontier, seen = [port.get_source_output().get_node()], 0
    while frontier and seen < 8:
        node = frontier.pop()
        seen += 1
        if node.get_type_name() == "Constant":
            if node.get_output_element_type(0).get_type_name() in ("i8", "u8", "i4", "u4"):
                return True
            continue
        if node.get_type_name() in ("Convert", "Subtract", "Multiply", "Reshape"):
            frontier += [node.input_value(i).get_node() for i in range(node.get_input_size())]
    return False


def _is_quantized(op: Any) -> bool:
    return any(
        _fq_edge(op.input(i)) is not None or (i > 0 and _quantized_const(op.input(i)))
        for i in range(op.get_input_size())
    )


def _bias_add(op: Any) -> tuple[Any, int] | None:
    """The ``Add`` after ``op`` whose other input is a constant (the bias), and that input's index."""
    for target in op.output(0).get_target_inputs():
        add = target.get_node()
        if add.get_type_name() != "Add":
            continue
        for i in range(2):
            if _const_source(add.input(i)) is not None and i != target.get_index():
                return add, i
    return None


class OpenVinoQuantizer:
    """Static int8 for OpenVINO with NNCF, calibrated once.

    Args:
        fp32_path: the float IR (``.xml``).
        calibration: calibration inputs, samples first.
        scheme: ``openvino_preset`` picks NNCF's preset (``PERFORMANCE``, its default and the
            fastest, unless the stage asks for asymmetric activations: ``MIXED``); on targets
            whose CPUs all have VNNI (``vnni``) NNCF's overflow fix is off, so the first layer
            keeps 8-bit weights (the fix stores them in 7 bits for AVX2 CPUs without VNNI).
        work_dir: unused (NNCF keeps its statistics in memory).
        names: maps OpenVINO friendly names to PyTorch module names.
        original: returns the IR whose weights and biases a layer kept in float gets back (the
            model before bias correction, see ``quantize/ptq.py``); default: ``fp32_path``'s.
    """

    format = "openvino"

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
        import nncf
        import openvino as ov

        check_method(scheme.method, "openvino", _METHODS)
        core = ov.Core()
        self._original = original
        self._float_model: Any = None if original else core.read_model(str(fp32_path))
        advanced = advanced_parameters(scheme)
        # one sample per item, every input in its own dtype (a dict when the model has several)
        graph = self._float_model or core.read_model(str(fp32_path))
        specs = [
            (
                p.get_any_name(),
                [d.get_length() if d.is_static else -1 for d in p.get_partial_shape()],
                p.get_element_type().to_dtype(),
            )
            for p in graph.inputs
        ]
        feeds = feeds_for(calibration, specs, batch=1)
        items = [f[specs[0][0]] if len(specs) == 1 else f for f in feeds]
        dataset = nncf.Dataset(items)
        # transformers: NNCF's transformer recipe (SmoothQuant moves activation outliers into the
        # weights); float layers then keep their int8-rounded weights (the smoothed float weights
        # are not kept), only their activations become float
        self.transformer = scheme.mode == "transformer"
        kind: dict[str, Any] = (
            {"model_type": nncf.ModelType.TRANSFORMER}
            if self.transformer
            else {
                "preset": nncf.QuantizationPreset.MIXED
                if scheme.openvino_preset == "mixed"
                else nncf.QuantizationPreset.PERFORMANCE
            }
        )
        # NNCF shows its own progress bars (statistics collection, bias correction); only its
        # INFO log lines are silenced
        with _nncf_quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.quantized = nncf.quantize(
                core.read_model(str(fp32_path)),
                dataset,
                subset_size=len(items),
                advanced_parameters=advanced,
                **kind,
            )
        names = names or ModuleNames()
        source = core.read_model(str(fp32_path))  # the weights' shapes (same graph as original)
        float_ops = {op.get_friendly_name(): op for op in source.get_ops()}
        self.layers = []
        for op in self.quantized.get_ordered_ops():
            kind = op.get_type_name()
            if kind in _NOT_LAYERS or kind in _AGNOSTIC or not _is_quantized(op):
                continue
            fop = float_ops.get(op.get_friendly_name())
            w = (
                _const_source(fop.input(1))
                if fop is not None and fop.get_input_size() > 1
                else None
            )
            params = int(np.prod(list(w.get_output_shape(0)))) if w is not None else 0
            name = display_name(
                names.resolve(_module_of(op)), kind, op.get_friendly_name(), kind in WEIGHTED_OPS
            )
            self.layers.append(Layer(op.get_friendly_name(), name, kind, params))

    @property
    def float_model(self) -> Any:
        """The IR that layers kept in float take their weights and biases from (read on first use)."""
        if self._float_model is None:
            import openvino as ov

            assert self._original is not None
            self._float_model = ov.Core().read_model(str(self._original()))
        return self._float_model

    def _revert(self, op: Any, float_op: Any | None) -> None:
        from openvino import opset13 as ops

        for i in range(op.get_input_size()):
            edge = _fq_edge(op.input(i))
            if edge is not None:
                port, fq = edge
                port.replace_source_output(fq.input_value(0))
        if float_op is None or self.transformer:
            return
        # the original float weights (NNCF stored them as int8 plus a dequantizing subgraph) ...
        for i in range(1, min(op.get_input_size(), float_op.get_input_size())):
            fsrc = _const_source(float_op.input(i))
            if fsrc is not None and _quantized_const(op.input(i)):
                op.input(i).replace_source_output(ops.constant(fsrc.get_data().copy()).output(0))
        # ... and the bias before NNCF's bias correction
        qa, fa = _bias_add(op), _bias_add(float_op)
        if qa and fa:
            fsrc = _const_source(fa[0].input(fa[1]))
            if fsrc is not None:
                qa[0].input(qa[1]).replace_source_output(
                    ops.constant(fsrc.get_data().copy()).output(0)
                )

    def quantize(self, path: Path, float_layers: Collection[str]) -> list[Path]:
        """Write the int8 IR with ``float_layers`` (friendly names) kept in float."""
        from edgesmith.export.openvino import save_ir

        model = self.quantized.clone()
        wanted = set(float_layers)
        float_ops = (
            {op.get_friendly_name(): op for op in self.float_model.get_ops()} if wanted else {}
        )
        for op in model.get_ops():
            name = op.get_friendly_name()
            if name in wanted:
                self._revert(op, float_ops.get(name))
        model.validate_nodes_and_infer_types()
        save_ir(model, path)
        return [path, path.with_suffix(".bin")]


def advanced_parameters(scheme: Scheme) -> Any:
    """NNCF's advanced options for ``scheme``: per-tensor weights, percentile ranges, overflow fix.

    ``percentile`` is NNCF's ``MEAN_QUANTILE`` (the 0.01% and 99.99% quantiles, averaged over
    samples). The overflow fix (7-bit first-layer weights) stays on unless every CPU of the target
    has VNNI; with it off the first layer keeps the 8-bit weights that bias correction rounded.
    """
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
        QuantizationParameters,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    options: dict[str, Any] = {}
    if not scheme.per_channel:
        options["weights_quantization_params"] = QuantizationParameters(per_channel=False)
    if scheme.method == "percentile":
        options["activations_range_estimator_params"] = RangeEstimatorParametersSet.MEAN_QUANTILE
    if scheme.vnni:
        options["overflow_fix"] = OverflowFix.DISABLE
    return AdvancedQuantizationParameters(**options)


def to_fp16(fp32_path: Path, path: Path) -> list[Path]:
    """FP16 weights and FP16 inference (where the device has it: GPUs, NPUs, recent CPUs)."""
    return _half(fp32_path, path, "f16")


def to_bf16(fp32_path: Path, path: Path) -> list[Path]:
    """FP16-stored weights and bf16 inference (CPUs with AVX-512 BF16 or AMX)."""
    return _half(fp32_path, path, "bf16")


def _half(fp32_path: Path, path: Path, precision: str) -> list[Path]:
    """FP16 weights, and the inference precision (``f16``/``bf16``) recorded in the IR's runtime options."""
    import openvino as ov

    from edgesmith.export.openvino import save_ir

    model = ov.Core().read_model(str(fp32_path))
    model.set_rt_info(precision, ["runtime_options", "INFERENCE_PRECISION_HINT"])
    save_ir(model, path, compress_to_fp16=True)
    return [path, path.with_suffix(".bin")]


def weight_only_int8(fp32_path: Path, path: Path) -> list[Path]:
    """Int8 weights (NNCF ``compress_weights``, asymmetric per channel), float activations."""
    import nncf
    import openvino as ov

    from edgesmith.export._quiet import quiet
    from edgesmith.export.openvino import save_ir

    with quiet():
        model = nncf.compress_weights(
            ov.Core().read_model(str(fp32_path)), mode=nncf.CompressWeightsMode.INT8_ASYM
        )
    save_ir(model, path)
    return [path, path.with_suffix(".bin")]
