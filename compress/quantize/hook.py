"""The quantize stage's work: input checks at stage time, variants of each exported artifact later.

``install`` runs when the stage runs (before export): it checks the formats against the target,
collects and checks the calibration data, and registers a :class:`QuantizeHook` as an artifact
hook. The pipeline calls ``hook(ctx, fp32_artifact, evaluator)`` for every exported format; it
returns the variants and their checks (the accuracy budget, the int8 search).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
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
    ptq_array,
    ptq_skip_reason,
)
from edgesmith.compress.quantize.report import TOOLS, _info, _plot_sensitivity
from edgesmith.compress.quantize.speed import _speed, _timing
from edgesmith.errors import EdgesmithError, RecipeError
from edgesmith.progress import echo, track

if TYPE_CHECKING:
    from edgesmith.compress.base import Context
    from edgesmith.compress.quantize.probe import Probe
    from edgesmith.export.evaluate import Artifact, Evaluator

__all__ = ["QuantizeHook", "check_formats", "install"]

# the hint of a failed int8 search whose accuracy held: int8 parity is what failed
SEARCH_HINT = (
    "try the qat stage, more calibration samples or max_float_layers; relax the int8 'parity:' "
    "tolerance only if you can defend it"
)


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
    _ptq: Any = None  # the bias-corrected model (quantize/ptq.py), made once for every format
    ptq_note: Any = None  # why there is none, when there is none

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

    def ptq(self, ctx: Context) -> Any:
        """The bias-corrected model of ``ctx.model`` (made once, shared by every format), or None
        when ``bias_correction`` is off or the model cannot be traced (``ptq_note`` says why)."""
        if self._ptq is not None or self.ptq_note is not None:
            return self._ptq
        if not self.config.bias_correction:
            self.ptq_note = {"method": "none", "reason": "bias_correction: false"}
            return None
        skip = ptq_skip_reason(self.scheme.mode, self.calibration)
        if skip:
            self.ptq_note = {"method": "none", "reason": skip}
            return None
        from edgesmith.compress.quantize.ptq import PtqSkipped, apply

        n = min(self.config.bias_correction_samples, len(self.calibration))
        how = "learned rounding" if self.config.rounding == "learned" else "rounding weights"
        echo(f"{self.stage}: folding batch norms, {how}, correcting biases ({n} samples)")
        try:
            self._ptq = apply(
                ctx.model,
                ptq_array(self.calibration),
                samples=n,
                per_channel=self.scheme.per_channel,
                activations="int8" if self.scheme.activations_symmetric else "uint8",
                rounding=self.config.rounding,
                progress=lambda nodes: track(nodes, "bias correction"),
            )
        except PtqSkipped as exc:
            echo(f"{self.stage}: bias correction skipped: {exc}")
            self.ptq_note = {"method": "none", "reason": str(exc)}
            return None
        echo(
            f"{self.stage}: {len(self._ptq.layers)} layers rounded and corrected, "
            f"{self._ptq.folded} batch norms folded in {self._ptq.seconds:.0f} s"
        )
        return self._ptq

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
    from edgesmith.compress.quantize.contract import int8_contract
    from edgesmith.compress.quantize.mixed import search
    from edgesmith.compress.quantize.speed import make_timer

    config, calibration = hook.config, hook.calibration
    fmt = art.format
    t0 = time.perf_counter()
    work = ctx.work_dir / f"quantize-{fmt}"
    work.mkdir(parents=True, exist_ok=True)
    ptq = hook.ptq(ctx)
    source, original = _sources(ctx, art, ptq, work)
    recipe = int8_recipe(hook.scheme.mode, fmt)
    if recipe:
        echo(f"{fmt} int8 ({hook.scheme.mode}): {recipe.split(':')[0]}")
    else:
        echo(f"{fmt} int8: calibrating with {TOOLS[fmt]} on {len(calibration)} samples")
    registry = {"transformer": TRANSFORMER_QUANTIZERS, "dynamic": DYNAMIC_QUANTIZERS}.get(
        hook.scheme.mode, QUANTIZERS
    )
    quantizer = _load(registry[fmt])(
        source, calibration, hook.scheme, work, hook.names(ctx), original=original
    )
    contract = int8_contract(ctx.recipe.parity, config.max_accuracy_drop)

    order = np.random.default_rng(ctx.recipe.seed).permutation(len(ev.inputs))
    pick = np.sort(order[: config.search_samples])
    sens = np.sort(order[: min(config.sensitivity_samples, len(pick))])

    # the budget counts from the float model as exported, or (after qat) as it entered qat
    float_accuracy = float(ev.metric(ev.reference, ev.targets))
    base = float_accuracy if hook.reference_accuracy is None else hook.reference_accuracy
    shift = base - float_accuracy
    probe = _probes(ev, contract.tolerance, shift)

    initial = _initial_float(config, quantizer.layers, fmt)
    max_float = (
        config.max_float_layers
        if config.max_float_layers is not None
        else max(1, len(quantizer.layers) // 4)
    )
    ranking, shares = _ranking(
        ptq, quantizer.layers, overflow_fix=fmt == "openvino" and not hook.scheme.vnni
    )
    result = search(
        quantizer,
        probe(pick),
        verify=probe(np.arange(len(ev.inputs))) if len(pick) < len(ev.inputs) else None,
        max_accuracy_drop=config.max_accuracy_drop,
        max_float_layers=max_float,
        initial_float=initial,
        refine=config.refine,
        work_dir=work,
        suffix=art.path.suffix,
        sensitivity_probe=probe(sens),
        ranking=ranking,
        cost_share=shares,
        timer=make_timer(ev.threads, _timing(ev), prepare=getattr(ev, "declare", None)),
    )
    dest = _dest(ctx, art, "int8")
    files = quantizer.quantize(dest, result.float_layers)
    by_id = {layer.id: layer for layer in quantizer.layers}
    info = _info(hook, quantizer, result, ptq, contract, len(sens), time.perf_counter() - t0)
    if recipe:
        info["int8_recipe"] = recipe
    if result.sensitivity and result.float_layers:
        info["sensitivity_plot"] = _plot_sensitivity(
            result, by_id, art.path.parent, ctx.recipe.name, fmt
        )
    a = ev.evaluate(
        dest,
        fmt,
        "int8",
        files=files,
        extra={"quantization": info},
        tolerance=contract.tolerance,
        parity_source=contract.describe(),
    )
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
    budget_ok = all(c.passed for c in checks)
    if not result.accepted and budget_ok:
        checks.append(
            Check(
                hook.stage,
                "parity",
                None,
                None,
                False,
                SEARCH_HINT,
                f"{dest.name}: no int8 model met the checks; {result.reason}; the parity check "
                f"was {contract.describe()}",
            )
        )
    failed_parity = not a.parity.passed or (not result.accepted and budget_ok)
    info["accuracy_contract"] = contract.to_json(
        "parity" if failed_parity and budget_ok else contract.gate
    )
    speed = _speed(a, art, ev, config.require_speedup, hook.stage)
    info["speed"], checks = speed[0], checks + speed[1]
    echo(
        f"{dest.name}: accuracy {a.accuracy:.4f} (float {base:.4f}, drop {drop * 100:.2f} points), "
        f"{agreement_text(a.parity)}, {len(result.float_layers)} of "
        f"{len(quantizer.layers)} layers float ({kept}); {info['speed']['ratio']:.2f}x the time "
        f"of {info['speed']['baseline']}"
    )
    return a, checks


def _sources(
    ctx: Context, art: Artifact, ptq: Any, work: Path
) -> tuple[Path, Callable[[], Path] | None]:
    """The float file the format's tool quantizes (the bias-corrected model exported, or the fp32
    artifact), and a function exporting the uncorrected folded model on first need (for layers
    kept in float), or None."""
    if ptq is None:
        return art.path, None
    from edgesmith.export import get_exporter

    exporter = get_exporter(art.format)
    source = work / f"corrected{art.path.suffix}"
    echo(f"exporting the bias-corrected model to {art.format}")
    exporter(ptq.model.eval(), (ctx.example_input,), source)
    cache: list[Path] = []

    def original() -> Path:
        if not cache:
            path = work / f"original{art.path.suffix}"
            echo(f"exporting the uncorrected model to {art.format} (for the layers kept float)")
            exporter(ptq.original.eval(), (ctx.example_input,), path)
            cache.append(path)
        return cache[0]

    return source, original


def _probes(ev: Evaluator, tolerance: Any, shift: float) -> Callable[[np.ndarray], Probe]:
    from edgesmith.compress.quantize.probe import Probe
    from edgesmith.metrics import top1, top5

    per_sample = {top1: _hit(1), top5: _hit(5)}.get(ev.metric)  # type: ignore[call-overload]

    from edgesmith.feeds import take_targets

    per_output = ev.tolerances("int8", tolerance)

    def probe(idx: np.ndarray) -> Probe:
        p = Probe(
            ev.inputs[idx],
            take_targets(ev.reference, idx),
            take_targets(ev.targets, idx),
            ev.metric,
            per_output,
            ev.threads,
            head=ev.head,
            per_sample=per_sample,
            evaluator=ev,
        )
        p.base_accuracy += shift
        return p

    return probe


def _hit(k: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def hit(outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        out = np.asarray(outputs).reshape(len(targets), -1)
        top = np.argsort(-out, axis=1)[:, :k]
        return (top == np.asarray(targets)[:, None]).any(axis=1)

    return hit


def _ranking(
    ptq: Any, layers: list[Any], overflow_fix: bool
) -> tuple[Callable[[list[Any]], dict[str, float]] | None, dict[str, float]]:
    """The float-layer search's ranking from the bias-correction walk: the error each layer adds
    (what keeping it float removes, measured on the calibration samples at no extra cost), and
    each layer's share of the MACs; (None, {}) without a bias-corrected model.

    ``overflow_fix``: NNCF stores the first convolutions' weights in 7 bits (a twice coarser step:
    four times the rounding error), so their estimate is four times larger.
    """
    if ptq is None:
        return None, {}
    macs = ptq.macs
    added = {s.name: s.added * (4.0 if overflow_fix and s.first else 1.0) for s in ptq.layers}
    total = float(sum(macs.values())) or 1.0
    shares = {layer.id: macs.get(layer.name, 0) / total for layer in layers}

    def rank(pool: list[Any]) -> dict[str, float]:
        return {layer.id: added[layer.name] for layer in pool if layer.name in added}

    return rank, shares
