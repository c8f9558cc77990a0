"""ONNX int8 with onnxruntime.quantization: static QDQ (or QOperator), per-channel weights.

The model is pre-processed once (``quant_pre_process``: shape inference and graph fusions), then
calibrated once into a cache file, so that each quantization with another set of float layers
(``nodes_to_exclude``) costs a graph rewrite, not a calibration.
"""

from __future__ import annotations

import contextlib
import logging
import os
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
    "OnnxQuantizer",
    "graph_inputs",
    "layer_ops",
    "preprocess",
    "to_fp16",
    "weight_only_int8",
]

log = logging.getLogger(__name__)

# operators that only move or clip int8 data: never worth keeping float on their own
TRANSPARENT_OPS = (
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Split", "Slice", "Gather",
    "GatherElements", "Pad", "Clip", "Relu", "LeakyRelu", "MaxPool", "Where", "TopK", "CumSum",
    "ArgMax",
)  # fmt: skip


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def layer_ops() -> set[str]:
    """Operators onnxruntime quantizes (its QDQ and QLinear registries) that do arithmetic."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return (set(QDQRegistry) | set(QLinearOpsRegistry)) - set(TRANSPARENT_OPS)


_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
CALIBRATION_BATCH = 32


@contextlib.contextmanager
def _ort_quiet() -> Iterator[None]:
    """onnxruntime.quantization logs advice at WARNING and prints histogram progress."""
    from edgesmith.export._quiet import quiet

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with quiet():
            yield
    finally:
        root.setLevel(level)


class _Reader:
    """A CalibrationDataReader over prepared ``{input name: array}`` batches (every input in its
    own dtype: token ids stay integers)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        from edgesmith.progress import track

        self.feeds = feeds
        # consumed only when calibrating (later quantizations read the calibration cache)
        self._it = iter(track(feeds, "calibrating onnx"))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.feeds[start_index:end_index])


def graph_inputs(model: Any) -> list[tuple[str, list[Any], Any]]:
    """``(name, shape, numpy dtype)`` of an ONNX model's inputs (initializers excluded)."""
    from onnx import helper

    inits = {i.name for i in model.graph.initializer}
    out = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or -1) for d in t.shape.dim
        ]
        out.append((v.name, shape, helper.tensor_dtype_to_np_dtype(t.elem_type)))
    return out


@contextlib.contextmanager
def _in_folder(folder: Path) -> Iterator[None]:
    """Run with ``folder`` as the working folder (contextlib.chdir is Python 3.11+)."""
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def preprocess(fp32_path: Path, out: Path, symbolic: bool = True) -> Path:
    """``quant_pre_process`` (shape inference, fusions) into ``out``; retried without symbolic shape
    inference (``symbolic=False``: only without), which fails on dynamo exports of attention
    models; the exported file itself when both fail (pre-processing is an optimisation)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, out = Path(fp32_path).resolve(), Path(out).resolve()
    for skip in (False, True) if symbolic else (True,):
        try:
            # a failed symbolic inference saves "sym_shape_infer_temp.onnx" (and its weights)
            # into the working folder: let that be the work folder, not the user's
            with _ort_quiet(), _in_folder(out.parent):
                quant_pre_process(str(src), str(out), skip_symbolic_shape=skip)
            return out
        except Exception as exc:
            log.info("onnx pre-processing (skip_symbolic_shape=%s) failed: %s", skip, exc)
    log.warning("onnx pre-processing failed; quantizing the exported graph")
    return fp32_path


def _module_of(node: Any) -> str | None:
    """The module path the dynamo exporter recorded for a node (``pkg.torch.onnx.name_scopes``)."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:  # metadata of a model file: any text (deep nesting, huge numbers)
                scopes = ast.literal_eval(prop.value[:100_000])
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return None
            if not isinstance(scopes, list | tuple):
                return None
            mods = [s for s in scopes[:-1] if isinstance(s, str) and s]
            return mods[-1] if mods else None
    return None


def _float_tensors(model: Any) -> set[str]:
    """Names of float32 tensors (shape inference ran in pre-processing); all, if it did not."""
    import onnx

    infos = [*model.graph.value_info, *model.graph.output]
    if not infos:
        return {o for n in model.graph.node for o in n.output}
    return {v.name for v in infos if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}


class OnnxQuantizer:
    """Static int8 for ONNX Runtime, calibrated once.

    Args:
        fp32_path: the exported float ``.onnx``.
        calibration: calibration inputs, samples first.
        scheme: the int8 scheme (per-channel, activation signedness, QDQ/QOperator, method).
        work_dir: a private folder for the pre-processed model and the calibration cache.
        names: maps exporter scopes to PyTorch module names (for the report).
        original: returns the model whose weights and biases a node kept in float gets back (the
            model before bias correction, see ``quantize/ptq.py``: same graph, same names);
            None keeps ``fp32_path``'s.
    """

    format = "onnx"

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
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantType

        check_method(scheme.method, "onnx", _METHODS)
        self.scheme = scheme
        self._original = original
        self._original_inits: dict[str, Any] | None = None
        work_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir = work_dir
        self.source = preprocess(fp32_path, work_dir / "preprocessed.onnx")
        self.cache = work_dir / "calibration.json"
        model = onnx.load(str(self.source))
        # graph optimisation may drop the exporter's metadata: fall back to the exported graph's
        exported = {n.name: _module_of(n) for n in onnx.load(str(fp32_path)).graph.node}
        self.input_name = model.graph.input[0].name
        self._feeds = feeds_for(calibration, graph_inputs(model), CALIBRATION_BATCH)
        inits = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
        names = names or ModuleNames()
        ops = layer_ops()
        floats = _float_tensors(model)
        self.layers = [
            Layer(
                n.name,
                display_name(
                    names.resolve(_module_of(n) or exported.get(n.name)),
                    n.op_type,
                    n.name,
                    weighted=n.op_type in WEIGHTED_OPS,
                ),
                n.op_type,
                sum(inits.get(i, 0) for i in n.input[1:2]),
            )
            for n in model.graph.node
            if n.op_type in ops and n.output and n.output[0] in floats
        ]
        self._kwargs: dict[str, Any] = {
            "per_channel": scheme.per_channel,
            "activation_type": QuantType.QInt8
            if scheme.activations_symmetric
            else QuantType.QUInt8,
            "weight_type": QuantType.QInt8,
            "calibrate_method": getattr(CalibrationMethod, _METHODS[scheme.method]),
            "extra_options": {
                "ActivationSymmetric": scheme.activations_symmetric,
                "WeightSymmetric": True,
            },
        }
        if scheme.method != "minmax":
            # histogram calibrators fail on a last batch of another size ("inhomogeneous shape"):
            # use whole batches only, and bound the outputs they hold in memory
            calibration = calibration[
                : max(1, len(calibration) // CALIBRATION_BATCH) * CALIBRATION_BATCH
            ]
            self._kwargs["extra_options"]["CalibMaxIntermediateOutputs"] = 4
        self._calibration = calibration
        self.quantize(work_dir / "calibrate.onnx", ())  # calibrates and fills the cache

    def quantize(self, path: Path, float_layers: Collection[str]) -> list[Path]:
        """Write the int8 model with ``float_layers`` (node names) left in float."""
        from onnxruntime.quantization import QuantFormat, quantize_static

        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with _ort_quiet():
                quantize_static(
                    str(self.source),
                    str(tmp),
                    _Reader(self._feeds),
                    quant_format=QuantFormat.QDQ if self.scheme.qdq else QuantFormat.QOperator,
                    nodes_to_exclude=sorted(float_layers),
                    calibration_cache_path=str(self.cache),
                    **self._kwargs,
                )
            _finish(tmp, self._restore_inits(float_layers) if float_layers else {})
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return [path]

    def _restore_inits(self, float_layers: Collection[str]) -> dict[str, Any]:
        """The original float weights and biases of the nodes kept in float (by initializer name)."""
        if self._original is None:
            return {}
        import onnx

        if self._original_inits is None:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = self.work_dir / "original-preprocessed.onnx"
            source = self._original()
            try:
                with _ort_quiet():
                    quant_pre_process(str(source), str(pre))
            except Exception:  # as for the model itself: the raw graph then
                pre = source
            model = onnx.load(str(pre))
            inits = {i.name: i for i in model.graph.initializer}
            self._original_inits = {
                n.name: [inits[i] for i in n.input[1:] if i in inits] for n in model.graph.node
            }
        out: dict[str, Any] = {}
        for name in float_layers:
            for init in self._original_inits.get(name, []):
                out[init.name] = init
        return out


def _finish(path: Path, restore: dict[str, Any]) -> None:
    """Put the original float weights back into the nodes kept in float (``restore``: initializers
    by name), and drop the exporter's per-node metadata (module scopes, stack traces: ~100 kB on
    EfficientNet-Lite0); the report has already taken the layer names."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for init in model.graph.initializer:
        new = restore.get(init.name)
        if (
            new is not None
            and list(new.dims) == list(init.dims)
            and new.data_type == init.data_type
        ):
            init.CopyFrom(new)
    onnx.save(model, str(path))


def to_fp16(fp32_path: Path, path: Path) -> list[Path]:
    """A float16 copy of the model (float32 inputs and outputs), with onnxruntime's converter."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    with _ort_quiet():
        half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    _save(half, path)
    return [path]


def weight_only_int8(fp32_path: Path, path: Path) -> list[Path]:
    """Int8 weights (per output channel, symmetric) dequantized at load time; float compute.

    Every float initializer feeding a ``Conv``/``Gemm``/``MatMul`` weight input becomes an int8
    tensor plus a ``DequantizeLinear`` node: a 4x smaller file, the float kernels at run time.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(fp32_path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    new_nodes = []
    for name, uses in consumers.items():
        init = inits.get(name)
        if init is None or init.data_type != onnx.TensorProto.FLOAT or len(init.dims) < 2:
            continue
        if not all(
            n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") and i == 1 for n, i in uses
        ):
            continue
        w = numpy_helper.to_array(init).astype(np.float32)
        op = uses[0][0]
        if op.op_type == "Gemm":
            axis = 0 if next((a.i for a in op.attribute if a.name == "transB"), 0) else 1
        elif op.op_type == "ConvTranspose":
            axis = 1
        else:
            axis = 0 if op.op_type == "Conv" else w.ndim - 1
        reduce = tuple(d for d in range(w.ndim) if d != axis)
        scale = np.maximum(np.abs(w).max(axis=reduce), 1e-12) / 127.0
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        graph.initializer.remove(init)
        graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{name}_int8"),
                numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
                numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_zero"),
            ]
        )
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{name}_int8", f"{name}_scale", f"{name}_zero"],
                [name],
                name=f"{name}_dequantize",
                axis=axis,
            )
        )
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)
    _save(model, path)
    return [path]


def _save(model: Any, path: Path) -> None:
    import onnx

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
