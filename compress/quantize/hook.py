"""The quantize stage's work: input checks at stage time, variants of each exported artifact later.

``install`` runs when the stage runs (before export): it checks the formats against the target,
collects and checks the calibration data, and registers ``derive`` as an artifact hook. The
pipeline calls ``derive(ctx, fp32_artifact, evaluator)`` for every exported format.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgesmith.compress.quantize.config import QuantizeConfig, resolve_scheme
from edgesmith.errors import EdgesmithError, RecipeError
from edgesmith.progress import echo

if TYPE_CHECKING:
    from edgesmith.compress.base import Context
    from edgesmith.pipeline import Artifact, Evaluator

__all__ = ["check_formats", "derive", "install"]

TOOLS = {
    "onnx": "onnxruntime.quantization",
    "openvino": "nncf",
    "tflite": "ai-edge-quantizer",
}


def _load(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def check_formats(formats: list[str], profile: dict[str, Any] | None, target: str) -> None:
    """Refuse a format the target profile cannot run (its ``formats`` list)."""
    allowed = list((profile or {}).get("formats") or [])
    bad = [f for f in formats if allowed and f not in allowed]
    if bad:
        raise RecipeError(
            f"target '{target}' cannot run {', '.join(bad)} (it runs {', '.join(allowed)})",
            hint=f"remove {', '.join(bad)} from 'export', or pick a target that runs it "
            "(`edgesmith devices list`)",
        )


def install(ctx: Context, config: QuantizeConfig, stage: str = "quantize") -> Context:
    """Check the inputs of quantization now and register the hook that quantizes each artifact.

    Raises:
        RecipeError: a format the target cannot run.
        DataError: too few calibration samples, or samples of the wrong shape.
    """
    from edgesmith.compress.quantize.base import calibration_array

    check_formats(list(ctx.recipe.export), ctx.profile, ctx.recipe.target)
    scheme = resolve_scheme(ctx.profile, config)
    calibration = calibration_array(
        ctx.data.calibration,
        config.calibration_samples,
        config.min_calibration_samples,
        tuple(ctx.example_input.shape[1:]),
    )
    first = "quantize" not in ctx.extra
    ctx.extra["quantize"] = {"config": config, "scheme": scheme, "calibration": calibration}
    if first:
        ctx.artifact_hooks.append(derive)
    ctx.extra["record"] = {
        **ctx.extra.get("record", {}),
        "quantization": {
            "scheme": scheme.to_json(),
            "precisions": list(config.precisions),
            "calibration_samples": len(calibration),
            "max_accuracy_drop": config.max_accuracy_drop,
        },
    }
    echo(
        f"{stage}: {', '.join(config.precisions)} for {', '.join(ctx.recipe.export)} after export; "
        f"{len(calibration)} calibration samples; scheme {scheme.to_json()}"
    )
    return ctx


def derive(ctx: Context, art: Artifact, ev: Evaluator) -> list[Artifact]:
    """The artifact hook: every configured variant of one fp32 artifact, evaluated."""
    from edgesmith.compress.quantize import ARCH_MISSING_VARIANTS, MISSING_VARIANTS, VARIANTS

    state = ctx.extra["quantize"]
    config: QuantizeConfig = state["config"]
    arch = str((ctx.profile or {}).get("arch", ""))
    out: list[Artifact] = []
    for precision in config.precisions:
        reason = ARCH_MISSING_VARIANTS.get((art.format, precision, arch))
        if reason:
            echo(f"{art.format} {precision}: skipped for {arch} ({reason})")
            art.extra.setdefault("skipped_variants", {})[precision] = reason
            continue
        if precision == "int8":
            out.append(_int8(ctx, art, ev, state))
            continue
        key = (art.format, precision)
        if key not in VARIANTS:
            reason = MISSING_VARIANTS.get(key, f"no {precision} variant for {art.format}")
            echo(f"{art.format} {precision}: skipped ({reason})")
            art.extra.setdefault("skipped_variants", {})[precision] = reason
            continue
        dest = _dest(ctx, art, precision)
        echo(f"deriving {dest.name}")
        files = _load(VARIANTS[key])(art.path, dest)
        out.append(ev.evaluate(dest, art.format, precision, files=files))
    return out


def _dest(ctx: Context, art: Artifact, precision: str) -> Path:
    return art.path.parent / f"{ctx.recipe.name}-{art.format}-{precision}{art.path.suffix}"


def _names(ctx: Context) -> Any:
    from edgesmith.compress.quantize.base import ModuleNames

    if "names" not in ctx.extra["quantize"]:
        ctx.extra["quantize"]["names"] = ModuleNames(ctx.model, ctx.example_input)
    return ctx.extra["quantize"]["names"]


def _initial_float(config: QuantizeConfig, layers: list[Any], fmt: str) -> list[str]:
    ids = []
    for want in config.float_layers:
        match = [layer.id for layer in layers if want in (layer.name, layer.id)]
        if not match:
            known = sorted({layer.name for layer in layers})
            raise EdgesmithError(
                f"float_layers names '{want}', which is not a quantizable layer of the {fmt} model",
                hint=f"known layers: {', '.join(known[:40])}{' ...' if len(known) > 40 else ''}",
            )
        ids += match
    return ids


def _int8(ctx: Context, art: Artifact, ev: Evaluator, state: dict[str, Any]) -> Artifact:
    from edgesmith.compress.quantize import QUANTIZERS
    from edgesmith.compress.quantize.mixed import Probe, search
    from edgesmith.runtime import load
    from edgesmith.runtime.bench import time_fn

    config: QuantizeConfig = state["config"]
    calibration: np.ndarray = state["calibration"]
    fmt = art.format
    t0 = time.perf_counter()
    echo(f"{fmt} int8: calibrating with {TOOLS[fmt]} on {len(calibration)} samples")
    work = ctx.work_dir / f"quantize-{fmt}"
    work.mkdir(parents=True, exist_ok=True)
    quantizer = _load(QUANTIZERS[fmt])(art.path, calibration, state["scheme"], work, _names(ctx))

    tolerance = ctx.recipe.parity.get("int8") or ctx.recipe.parity["fp32"]
    order = np.random.default_rng(ctx.recipe.seed).permutation(len(ev.inputs))
    pick = np.sort(order[: config.search_samples])
    sens = np.sort(order[: min(config.sensitivity_samples, len(pick))])

    # after qat the budget counts from the model as it entered qat, not the fine-tuned float one
    shift = state.get("base_accuracy")
    shift = 0.0 if shift is None else shift - float(ev.metric(ev.reference, ev.targets))

    def probe(idx: np.ndarray) -> Probe:
        p = Probe(
            ev.inputs[idx],
            ev.reference[idx],
            ev.targets[idx],
            ev.metric,
            tolerance,
            ev.threads,
            head=ev.head,
        )
        p.base_accuracy += shift
        return p

    initial = _initial_float(config, quantizer.layers, fmt)
    max_float = (
        config.max_float_layers
        if config.max_float_layers is not None
        else max(1, len(quantizer.layers) // 4)
    )
    result = search(
        quantizer,
        probe(pick),
        sensitivity_probe=probe(sens),
        verify=probe(np.arange(len(ev.inputs))) if len(pick) < len(ev.inputs) else None,
        max_accuracy_drop=config.max_accuracy_drop,
        max_float_layers=max_float,
        initial_float=initial,
        refine=config.refine,
        work_dir=work,
        suffix=art.path.suffix,
    )
    dest = _dest(ctx, art, "int8")
    files = quantizer.quantize(dest, result.float_layers)
    by_id = {layer.id: layer for layer in quantizer.layers}
    gains = {layer.id: gain for layer, gain in result.sensitivity}
    info: dict[str, Any] = {
        "tool": TOOLS[fmt],
        "scheme": state["scheme"].to_json(),
        "calibration_samples": len(calibration),
        "max_accuracy_drop": config.max_accuracy_drop,
        "layers": len(quantizer.layers),
        "int8_layers": len(quantizer.layers) - len(result.float_layers),
        "float_layers": [
            {
                **by_id[lid].to_json(),
                "extra_bytes": by_id[lid].params * 3,  # float32 instead of int8 weights
                "accuracy_cost": round(result.costs[lid], 6) if lid in result.costs else None,
                "noise_alone": float(f"{gains[lid]:.4g}") if lid in gains else None,
            }
            for lid in result.float_layers
        ],
        "search": {
            "samples": result.measurement.samples,
            "sensitivity_samples": len(sens),
            "candidates": len(result.trials),
            "accepted": result.accepted,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    }
    if result.float_layers:
        # what the float layers cost in speed: the all-int8 model timed the same way
        probe_path = work / f"all-int8{art.path.suffix}"
        quantizer.quantize(probe_path, [])
        m = load(probe_path, threads=ev.threads, device="cpu")
        one = ev.inputs[:1]
        info["latency_ms_all_int8"] = round(
            time_fn(lambda: ev.logits(m, one), warmup=20, runs=200, max_seconds=10.0)["p50"], 4
        )
    if result.sensitivity:
        info["sensitivity_plot"] = _plot_sensitivity(
            result, by_id, art.path.parent, ctx.recipe.name, fmt
        )
    a = ev.evaluate(dest, fmt, "int8", files=files, extra={"quantization": info})
    base = state.get("base_accuracy", float(ev.metric(ev.reference, ev.targets)))
    drop = base - a.accuracy
    info["accuracy_drop"] = round(drop, 6)
    kept = ", ".join(by_id[lid].name for lid in result.float_layers) or "none"
    if config.max_accuracy_drop is not None and drop > config.max_accuracy_drop + 1e-12:
        why = result.reason or "it held on the search samples but not on the whole evaluation set"
        ctx.extra.setdefault("failures", []).append(
            f"{dest.name}: accuracy drop {drop * 100:.2f} points > max_accuracy_drop "
            f"{config.max_accuracy_drop * 100:.2f} (best result: accuracy {a.accuracy:.4f} vs "
            f"{base:.4f} float, {len(result.float_layers)} layer(s) kept float: {kept}); {why}; "
            "try the qat stage, more calibration samples, max_float_layers, or a larger budget"
        )
    elif not result.accepted:
        ctx.extra.setdefault("failures", []).append(
            f"{dest.name}: no int8 model met the checks; {result.reason}; try the qat stage, more "
            "calibration samples, max_float_layers, or relaxing the int8 'parity:' tolerance"
        )
    echo(
        f"{dest.name}: accuracy {a.accuracy:.4f} (float {base:.4f}, drop {drop * 100:.2f} points), "
        f"top-1 agreement {a.parity.top1_agreement:.4f}, {len(result.float_layers)} of "
        f"{len(quantizer.layers)} layers float ({kept})"
    )
    return a


def _plot_sensitivity(result: Any, by_id: dict[str, Any], out: Path, name: str, fmt: str) -> str:
    """A bar chart of the most sensitive layers (kept-float ones highlighted); returns its file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = result.sensitivity[:25]
    kept = set(result.float_layers)
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(top) + 1.2))
    ax.barh(
        [layer.name for layer, _ in top][::-1],
        [max(noise, 1e-9) for _, noise in top][::-1],
        color=["tab:orange" if layer.id in kept else "tab:blue" for layer, _ in top][::-1],
    )
    ax.set_xscale("log")
    ax.set_xlabel("output noise with only this layer in int8 (||q - f||² / ||f||², log)")
    ax.set_title(
        f"{fmt} int8 sensitivity: orange = kept float ({len(kept)} of {len(by_id)} layers)"
    )
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path = out / f"{name}-{fmt}-int8-sensitivity.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name
