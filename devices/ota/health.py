"""The health check a new model must pass before the switch: it loads, it reproduces the
manifest's golden outputs within tolerance, it answers within the latency budget, and a head
fine-tuned on a device still knows the build's classes (accuracy on the bundle's held-out
memory samples within the budget of the build's reference accuracy; runtime/memory.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import BundleError, EdgesmithError
from edgesmith.runtime.golden import check_golden, read_golden_all

__all__ = ["HealthReport", "check_health", "check_old_classes"]

log = logging.getLogger(__name__)


@dataclass
class HealthReport:
    """The outcome of a health check; ``reason`` says why it failed."""

    ok: bool
    reason: str = ""
    max_abs_diff: float | None = None
    top1_agreement: float | None = None
    latency_ms: float | None = None
    golden: bool = False
    old_classes: dict[str, Any] | None = None  # the old-class check of a head fine-tuned here

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _zeros_for(spec: dict[str, Any]) -> np.ndarray:
    shape = [d if isinstance(d, int) else 1 for d in spec["shape"]]
    return np.zeros(shape, dtype=spec["dtype"])


def check_old_classes(model: Any, root: Path, budget: float | None = None) -> dict[str, Any] | None:
    """The old-class check of a head fine-tuned on a device (None: not such a head, or its
    bundle ships no held-out memory samples): its accuracy on the memory's held-out samples of
    the build classes against the build head's (``memory.reference_accuracy``).

    Raises:
        EdgesmithError: a malformed memory file.
    """
    from edgesmith.runtime.finetune.memory import check_old_classes as check
    from edgesmith.runtime.finetune.memory import load_memory

    m = model.manifest
    spec = (m.trainable_head or {}) if m is not None else {}
    if spec.get("trained", {}).get("by") != "device":
        return None
    memory = load_memory(root, spec, m)
    if memory is None or not len(memory.holdout) or memory.spec.reference_accuracy is None:
        return None
    result = check(
        memory,
        memory.features(model, "holdout"),
        model.head,
        list(m.labels or []),
        memory.spec.reference_accuracy,
        "the build's head",
        budget,
    )
    return {**result.to_json(), "message": "" if result.passed else result.message()}


def check_health(
    bundle: str | Path,
    latency_budget_ms: float | None = None,
    require_golden: bool = False,
    runs: int = 10,
    old_class_budget: float | None = None,
) -> HealthReport:
    """Load a bundle folder with ``edgesmith.runtime.load`` and check it.

    Args:
        bundle: an extracted, verified bundle folder.
        latency_budget_ms: fail if the median single-sample latency is above this.
        require_golden: fail bundles without golden data (else: load and one run only).
        runs: timed runs for the latency figure.
        old_class_budget: accuracy a head fine-tuned on a device may lose on the build classes
            (None: the bundle's ``trainable_head.memory.budget``).

    Example:
        >>> check_health("/var/lib/edgesmith/slots/b", latency_budget_ms=50).ok   # doctest: +SKIP
        True
    """
    from edgesmith.runtime import load

    root = Path(bundle)
    try:
        model = load(root, verify=True)
    except EdgesmithError as exc:
        return HealthReport(False, f"the model does not load: {exc.message}")
    except Exception as exc:  # a backend failing on a bad model must not take the agent down
        return HealthReport(False, f"the model does not load: {type(exc).__name__}: {exc}")
    manifest = model.manifest
    try:
        golden = check_golden(model, root)  # through the listed, hashed golden file
        if golden is None:
            if require_golden:
                return HealthReport(
                    False, "the bundle has no golden data and this device requires it"
                )
            if manifest is None:
                return HealthReport(False, "not a bundle")
            sample = [_zeros_for(spec) for spec in manifest.inputs]
            model(*sample)
        else:
            names = ([s.name for s in model.inputs], [s.name for s in model.outputs])
            data = read_golden_all(root, manifest, *names)
            if data is None:  # check_golden read it
                return HealthReport(False, "golden data vanished during the check")
            sample = [x[:1] for x in data[0]]
    except BundleError as exc:
        return HealthReport(False, f"golden data unreadable: {exc.message}")
    except EdgesmithError as exc:
        return HealthReport(False, f"the model fails on its golden inputs: {exc.message}")
    except (KeyError, ValueError, OSError) as exc:
        return HealthReport(False, f"golden data unreadable: {type(exc).__name__}: {exc}")
    except Exception as exc:
        return HealthReport(False, f"the model fails to run: {type(exc).__name__}: {exc}")
    report = HealthReport(True, golden=golden is not None)
    if golden is not None:
        report.max_abs_diff, report.top1_agreement = golden.max_abs_diff, golden.top1_agreement
        if not golden.ok:
            report.ok, report.reason = False, golden.reason
            return report
    try:
        report.old_classes = check_old_classes(model, root, old_class_budget)
    except EdgesmithError as exc:
        return HealthReport(False, f"the bundle's memory is unusable: {exc.message}")
    if report.old_classes is not None and not report.old_classes["passed"]:
        report.ok = False
        report.reason = report.old_classes["message"]
        return report
    if latency_budget_ms is not None:
        for _ in range(2):
            model(*sample)
        times = []
        for _ in range(max(runs, 1)):
            t0 = time.perf_counter()
            model(*sample)
            times.append((time.perf_counter() - t0) * 1000)
        report.latency_ms = float(np.median(times))
        if report.latency_ms > latency_budget_ms:
            report.ok = False
            report.reason = (
                f"median latency {report.latency_ms:.2f} ms is over the budget of "
                f"{latency_budget_ms:.2f} ms"
            )
    return report
