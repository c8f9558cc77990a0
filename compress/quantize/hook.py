"""The quantize stage's work: input checks at stage time, variants of each exported artifact later.

``install`` runs when the stage runs (before export): it checks the formats against the target,
collects and checks the calibration data, and registers a :class:`QuantizeHook` as an artifact
hook. The pipeline calls ``hook(ctx, fp32_artifact, evaluator)`` for every exported format; it
returns the variants and their checks (the accuracy budget, the int8 search).
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgesmith.checks import Check, accuracy_budget
from edgesmith.compress.base import HookResult
from edgesmith.compress.quantize.config import QuantizeConfig, Scheme, resolve_scheme
from edgesmith.compress.quantize.modes import (
    agreement_text,
    detect_mode,
    input_layouts,
    int8_recipe,
    mode_note,
)
from edgesmith.errors import EdgesmithError, RecipeError
from edgesmith.progress import echo

if TYPE_CHECKING:
    from edgesmith.compress.base import Context
    from edgesmith.export.evaluate import Artifact, Evaluator

__all__ = ["QuantizeHook", "check_formats", "install"]

# the hint of a failed int8 search whose accuracy held: int8 parity is what failed
SEARCH_HINT = (
    "try the qat stage, more calibration samples or max_float_layers; relax the int8 'parity:' "
    "tolerance only if you can defend it"
)

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


@dataclass
class QuantizeHook:
    """The artifact hook of ``quantize`` and ``qat``: every configured variant of each fp32 artifact.

    Attributes:
        config: the stage's options.
        scheme: the int8 scheme in force (target profile plus overrides).
        calibration: the calibration inputs, checked at stage time.
        stage: the stage that installed it (``quantize`` or ``qat``), named in its checks.
        reference_accuracy: the accuracy the budget counts from; None: the float model's as
            exported (``qat`` sets the model's as it entered ``qat``).
    """

    config: QuantizeConfig
    scheme: Scheme
    calibration: Any  # edgesmith.feeds.Samples (or one array, for one input)
    stage: str = "quantize"
    reference_accuracy: float | None = None
    _names: Any = None  # torch module names of the exported graph's layers, made once

    def __call__(self, ctx: Context, art: Artifact, ev: Evaluator) -> HookResult:
        from edgesmith.compress.quantize import ARCH_MISSING_VARIANTS, MISSING_VARIANTS, VARIANTS

        out = HookResult()
        arch = str((ctx.profile or {}).get("arch", ""))
        for precision in self.config.precisions:
            reason = ARCH_MISSING_VARIANTS.get((art.format, precision, arch))
            if reason:
                echo(f"{art.format} {precision}: skipped for {arch} ({reason})")
                art.extra.setdefault("skipped_variants", {})[precision] = reason
                continue
            if precision == "int8":
                artifact, checks = _int8(ctx, art, ev, self)
                out.artifacts.append(artifact)
                out.checks += checks
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
            out.artifacts.append(ev.evaluate(dest, art.format, precision, files=files))
        return out

    def names(self, ctx: Context) -> Any:
        """The module names of ``ctx.model``'s layers (traced once, shared by every format)."""
        from edgesmith.compress.quantize.base import ModuleNames

        if self._names is None:
            self._names = ModuleNames(ctx.model, ctx.example_input)
        return self._names


def install(
    ctx: Context, config: QuantizeConfig, stage: str = "quantize"
) -> tuple[QuantizeHook, dict[str, Any]]:
    """Check the inputs of quantization now and register the hook that quantizes each artifact.

    Returns:
        The hook (registered in ``ctx.artifact_hooks``, replacing an earlier one) and the
        ``quantization`` entry of the stage's report row.

    Raises:
        RecipeError: a format the target cannot run.
        DataError: too few calibration samples, or samples of the wrong shape.
    """
    from edgesmith.compress.quantize.base import calibration_samples

    check_formats(list(ctx.recipe.export), ctx.profile, ctx.recipe.target)
    mode = config.mode if config.mode != "auto" else detect_mode(ctx.model)
    scheme = resolve_scheme(ctx.profile, config, mode)
    calibration = calibration_samples(
        ctx.data.calibration,
        config.calibration_samples,
        config.min_calibration_samples,
        input_layouts(ctx),
    )
    hook = QuantizeHook(config, scheme, calibration, stage)
    ctx.artifact_hooks[:] = [h for h in ctx.artifact_hooks if not isinstance(h, QuantizeHook)]
    ctx.artifact_hooks.append(hook)
    echo(
        f"{stage}: {', '.join(config.precisions)} for {', '.join(ctx.recipe.export)} after export; "
        f"{len(calibration)} calibration samples; scheme {scheme.to_json()}" + mode_note(mode)
    )
    out: dict[str, Any] = {
        "scheme": scheme.to_json(),
        "precisions": list(config.precisions),
        "calibration_samples": len(calibration),
        "max_accuracy_drop": config.max_accuracy_drop,
    }
    if mode in ("transformer", "dynamic"):  # (a static int8 report keeps its keys)
        out["int8_recipe"] = {f: int8_recipe(mode, f) for f in ctx.recipe.export}
    return hook, out


def _dest(ctx: Context, art: Artifact, precision: str) -> Path:
    return art.path.parent / f"{ctx.recipe.name}-{art.format}-{precision}{art.path.suffix}"


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


def _int8(
    ctx: Context, art: Artifact, ev: Evaluator, hook: QuantizeHook
) -> tuple[Artifact, list[Check]]:
    from edgesmith.compress.quantize import (
        DYNAMIC_QUANTIZERS,
        QUANTIZERS,
        TRANSFORMER_QUANTIZERS,
    )
    from edgesmith.compress.quantize.mixed import Probe, search
    from edgesmith.feeds import take_targets

    config, calibration = hook.config, hook.calibration
    fmt = art.format
    t0 = time.perf_counter()
    recipe = int8_recipe(hook.scheme.mode, fmt)
    if recipe:
        echo(f"{fmt} int8 ({hook.scheme.mode}): {recipe.split(':')[0]}")
    else:
        echo(f"{fmt} int8: calibrating with {TOOLS[fmt]} on {len(calibration)} samples")
    work = ctx.work_dir / f"quantize-{fmt}"
    work.mkdir(parents=True, exist_ok=True)
    registry = {"transformer": TRANSFORMER_QUANTIZERS, "dynamic": DYNAMIC_QUANTIZERS}.get(
        hook.scheme.mode, QUANTIZERS
    )
    quantizer = _load(registry[fmt])(art.path, calibration, hook.scheme, work, hook.names(ctx))

    tolerance = ev.tolerances("int8")
    order = np.random.default_rng(ctx.recipe.seed).permutation(len(ev.inputs))
    pick = np.sort(order[: config.search_samples])
    sens = np.sort(order[: min(config.sensitivity_samples, len(pick))])

    # the budget counts from the float model as exported, or (after qat) as it entered qat
    float_accuracy = float(ev.metric(ev.reference, ev.targets))
    base = float_accuracy if hook.reference_accuracy is None else hook.reference_accuracy
    shift = base - float_accuracy

    def probe(idx: np.ndarray) -> Probe:
        p = Probe(
            ev.inputs[idx],
            take_targets(ev.reference, idx),
            take_targets(ev.targets, idx),
            ev.metric,
            tolerance,
            ev.threads,
            head=ev.head,
            evaluator=ev,
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
        **({"int8_recipe": recipe} if recipe else {}),
        "scheme": hook.scheme.to_json(),
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
        m = ev.load(probe_path)
        info["latency_ms_all_int8"] = round(ev.latency(m, max_seconds=10.0)["p50"], 4)
    if result.sensitivity:
        info["sensitivity_plot"] = _plot_sensitivity(
            result, by_id, art.path.parent, ctx.recipe.name, fmt
        )
    a = ev.evaluate(dest, fmt, "int8", files=files, extra={"quantization": info})
    drop = base - a.accuracy
    info["accuracy_drop"] = round(drop, 6)
    kept = ", ".join(by_id[lid].name for lid in result.float_layers) or "none"
    checks: list[Check] = []
    if config.max_accuracy_drop is not None:
        why = result.reason or "it held on the search samples but not on the whole evaluation set"
        checks.append(
            accuracy_budget(
                hook.stage,
                base,
                a.accuracy,
                config.max_accuracy_drop,
                f"{dest.name}: accuracy drop {drop * 100:.2f} points > max_accuracy_drop "
                f"{config.max_accuracy_drop * 100:.2f} (best result: accuracy {a.accuracy:.4f} vs "
                f"{base:.4f} float, {len(result.float_layers)} layer(s) kept float: {kept}); {why}; "
                "try the qat stage, more calibration samples, max_float_layers, or a larger budget",
            )
        )
    if not result.accepted and all(c.passed for c in checks):
        checks.append(
            Check(
                hook.stage,
                "parity",
                None,
                None,
                False,
                SEARCH_HINT,
                f"{dest.name}: no int8 model met the checks; {result.reason}; try the qat stage, more "
                "calibration samples, max_float_layers, or relaxing the int8 'parity:' tolerance",
            )
        )
    agreement = agreement_text(a.parity)
    echo(
        f"{dest.name}: accuracy {a.accuracy:.4f} (float {base:.4f}, drop {drop * 100:.2f} points), "
        f"{agreement}, {len(result.float_layers)} of "
        f"{len(quantizer.layers)} layers float ({kept})"
    )
    return a, checks


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
