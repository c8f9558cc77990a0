"""Options of the ``quantize`` stage and the int8 scheme a target profile asks for (import-light)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edgesmith.compress.base import StageConfig

__all__ = [
    "CALIBRATION_SUPPORT",
    "PRECISIONS",
    "QuantizeConfig",
    "Scheme",
    "has_vnni",
    "resolve_scheme",
]

# What a quantize stage can derive from each fp32 artifact: static int8 (weights and activations),
# weight-only int8 (``w8``: int8 weights, float compute), and half-precision variants.
PRECISIONS = ("int8", "w8", "fp16", "bf16")
WEIGHTS = ("per-channel-symmetric", "per-tensor-symmetric")
ACTIVATIONS = ("asymmetric-uint8", "symmetric-int8")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")
# the calibration methods each format's int8 quantizer implements (its ``_METHODS``); a recipe
# asking for another is refused when it is read, before any training or export
CALIBRATION_SUPPORT: dict[str, tuple[str, ...]] = {
    "onnx": ("minmax", "percentile", "entropy"),
    "openvino": ("minmax", "percentile"),
    "tflite": ("minmax", "mse"),
}


class QuantizeConfig(StageConfig):
    """Post-training quantization of every exported format, within an accuracy budget.

    Attributes:
        scheme: ``int8`` (the only integer scheme; kept for the recipe contract).
        max_accuracy_drop: the largest tolerated absolute drop of the recipe's metric (0.005 = half a
            point of top-1) against the float model; None checks nothing. When all-int8 misses it,
            the most sensitive layers stay in float, fewest first.
        precisions: which variants to derive from each fp32 artifact (``int8``, ``w8``, ``fp16``, ``bf16``).
        weights / activations / format: override the target profile's int8 scheme.
        calibration_method: ``minmax`` (all formats), ``percentile`` (onnx, openvino), ``entropy``
            (onnx), ``mse`` (tflite); see ``CALIBRATION_SUPPORT``.
        calibration_samples: how many calibration samples to use (default: all of ``data.calibration``).
        min_calibration_samples: fewer than this is an error (int8 ranges from a handful of samples
            are noise).
        search_samples: evaluation samples used while searching for float layers (the final check
            uses the whole evaluation set).
        sensitivity_samples: samples used to rank layers by sensitivity.
        max_float_layers: the most layers that may stay float (default: a quarter of the candidates).
        float_layers: layers (by name, as reported) to keep float from the start.
        refine: after the search, try to quantize each kept-float layer again (fewer float layers).
        mode: the int8 recipe. ``static`` quantizes weights and activations with calibrated
            ranges (CNNs). ``transformer`` uses what each format's tool recommends for
            transformers, whose activations have outlier channels: ONNX Runtime dynamic int8
            (per-channel weights, activations quantized at run time), NNCF with
            ``ModelType.TRANSFORMER`` (SmoothQuant), TFLite dynamic-range int8 (its full-integer
            int8 loses too much). ``dynamic``: int8 weights with activations quantized at run
            time for ONNX and TFLite, static int8 for OpenVINO (models whose float inputs have
            ranges one int8 scale cannot hold, such as raw tabular features). ``auto``:
            ``transformer`` for models with attention and no convolution (text and sequence
            encoders), else ``static``.
        bias_correction: before export, fold batch norms, round weights to the int8 grid and
            correct biases layer by layer in PyTorch (``quantize/ptq.py``), so that every format's
            tool quantizes the same corrected weights; False quantizes the model as exported.
        bias_correction_samples: calibration samples the bias correction uses (all in one batch).
        rounding: how the bias correction rounds weights to the int8 grid: ``learned`` (each
            weight up or down, whichever keeps the layer's output closest to the float model's
            on the calibration samples: AdaRound's objective, ``quantize/rounding.py``) or
            ``nearest``.
        require_speedup: fail the build when an int8 artifact is not faster than the best
            non-int8 option of its backend on this machine (fp32, or bf16/fp16 where the CPU runs
            them natively); without it such an artifact is reported with that option recommended.
    """

    scheme: Literal["int8"] = "int8"
    max_accuracy_drop: float | None = None
    precisions: list[Literal["int8", "w8", "fp16", "bf16"]] = Field(
        default_factory=lambda: ["int8"], min_length=1
    )
    weights: Literal["per-channel-symmetric", "per-tensor-symmetric"] | None = None
    activations: Literal["asymmetric-uint8", "symmetric-int8"] | None = None
    format: Literal["QDQ", "QOperator"] | None = None
    calibration_method: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"
    calibration_samples: int | None = Field(default=None, ge=1)
    min_calibration_samples: int = Field(default=32, ge=1)
    search_samples: int = Field(default=2000, ge=50)
    sensitivity_samples: int = Field(default=300, ge=20)
    max_float_layers: int | None = Field(default=None, ge=0)
    float_layers: list[str] = Field(default_factory=list)
    refine: bool = True
    mode: Literal["auto", "static", "transformer", "dynamic"] = "auto"
    bias_correction: bool = True
    bias_correction_samples: int = Field(default=64, ge=1, le=1024)
    rounding: Literal["learned", "nearest"] = "learned"
    require_speedup: bool = False

    @field_validator("max_accuracy_drop")
    @classmethod
    def _budget(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(
                f"max_accuracy_drop must be between 0 and 1 (an absolute drop of the metric, "
                f"e.g. 0.005 for half a point of top-1), got {v}"
            )
        return v

    @field_validator("precisions")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"precisions listed twice: {v}")
        return v

    @model_validator(mode="after")
    def _calibration(self) -> QuantizeConfig:
        if self.calibration_samples is not None and (
            self.calibration_samples < self.min_calibration_samples
        ):
            raise ValueError(
                f"calibration_samples={self.calibration_samples} is below "
                f"min_calibration_samples={self.min_calibration_samples}"
            )
        return self


@dataclass(frozen=True)
class Scheme:
    """The int8 scheme in force: from the target profile, overridden by the stage's options."""

    per_channel: bool = True
    activations_symmetric: bool = False  # False: asymmetric uint8 (U8S8 on x86/Arm CPUs)
    qdq: bool = True  # onnx only: QDQ (portable, fast on ORT) vs QOperator
    method: str = "minmax"
    mode: str = "static"  # or "transformer" (QuantizeConfig.mode, "auto" resolved per model)
    # the target's CPUs all have VNNI (avx512_vnni, avx_vnni or AMX): 8-bit weights cannot overflow
    # the int16 sums of AVX2's u8 x s8 instructions, so NNCF needs no 7-bit first layer there
    vnni: bool = False
    # OpenVINO: NNCF's preset; "performance" (symmetric activations, its default and fastest)
    # unless the stage asks for asymmetric activations
    openvino_preset: str = "performance"

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": "per-channel-symmetric" if self.per_channel else "per-tensor-symmetric",
            "activations": "symmetric-int8" if self.activations_symmetric else "asymmetric-uint8",
            "format": "QDQ" if self.qdq else "QOperator",
            "calibration_method": self.method,
            "target_vnni": self.vnni,
        }


def resolve_scheme(
    profile: dict[str, Any] | None, config: QuantizeConfig, mode: str = "static"
) -> Scheme:
    """The int8 scheme for a target: the profile's ``int8`` section, then the config's overrides.

    Profile fields are read defensively (a missing or partial ``int8`` section means the defaults:
    per-channel symmetric weights, asymmetric uint8 activations, QDQ).
    """
    raw = (profile or {}).get("int8") or {}
    if not isinstance(raw, dict):
        raw = getattr(raw, "model_dump", dict)()
    weights = config.weights or str(raw.get("weights", WEIGHTS[0]))
    activations = config.activations or str(raw.get("activations", ACTIVATIONS[0]))
    fmt = config.format or str(raw.get("format", "QDQ"))
    return Scheme(
        per_channel=weights != "per-tensor-symmetric",
        activations_symmetric=activations == "symmetric-int8",
        qdq=fmt.upper() != "QOPERATOR",
        method=config.calibration_method,
        mode=mode,
        vnni=has_vnni(profile),
        openvino_preset="mixed" if config.activations == "asymmetric-uint8" else "performance",
    )


VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def has_vnni(profile: dict[str, Any] | None) -> bool:
    """Whether every CPU the profile describes has an int8 dot-product instruction (VNNI or AMX):
    a flag in ``isa`` (all required), or only such flags in ``isa_any`` (one of them required)."""
    p = profile or {}
    isa = [str(f) for f in p.get("isa") or []]
    any_of = [str(f) for f in p.get("isa_any") or []]
    return str(p.get("arch", "x86_64")) in ("x86_64", "amd64") and (
        any(f in VNNI_FLAGS for f in isa) or (bool(any_of) and all(f in VNNI_FLAGS for f in any_of))
    )
