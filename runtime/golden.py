"""Golden data for a bundle's health check, in one place: which inputs, tolerances that hold across
CPUs, writing ``golden.npz``, reading it back and checking a model against it (the OTA health
check and the server's check before a model serves both call :func:`check_golden`).

A bundle's ``golden.npz`` holds a few evaluation inputs with the outputs the artifact gave on the
build machine; a device must reproduce them within ``atol``/``rtol`` and agree on the top-1 class.
The tolerances are sized for the kernels of other CPUs, not only the build machine's:

- fp32: ``atol = 1e-4 + 1e-4 * max|output|``, ``rtol = 1e-3`` (float summation order);
- other precisions (int8, fp16, ...): ``atol = 0.05 * max|output| + 1e-3``, ``rtol = 0.05``
  (int8 kernels may round requantization differently).

Measured by ``benchmarks/arm64_emulated.py`` (docs/benchmarks.md): ONNX Runtime and LiteRT bundles
built on x86-64 reproduce their golden outputs under emulated Cortex-A72 and Cortex-A76 with fp32
differences near 1e-6 and int8 outputs bit-exact; the manifest says so in ``holds_across``.
Golden samples are chosen so that the top-1 class leads the runner-up by more than twice ``atol``:
an output within tolerance can then never flip the top-1 check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import BundleError
from edgesmith.runtime.bundle.files import member_path
from edgesmith.runtime.bundle.manifest import Manifest
from edgesmith.runtime.outputs import compare_golden_outputs, golden_arrays
from edgesmith.text import printable

__all__ = [
    "GOLDEN_FILE",
    "GOLDEN_SAMPLES",
    "HOLDS_ACROSS",
    "MAX_GOLDEN_BYTES",
    "GoldenCheck",
    "check_golden",
    "compare_golden",
    "golden_tolerance",
    "make_golden",
    "pick_golden",
    "read_golden",
    "read_golden_all",
    "remake_golden",
]

GOLDEN_FILE = "golden.npz"
MAX_GOLDEN_BYTES = 256 << 20

GOLDEN_SAMPLES = 8
# CPU architectures whose kernels the tolerances were checked against (benchmarks/arm64_emulated.py)
HOLDS_ACROSS = ["x86_64", "aarch64"]


def golden_tolerance(precision: str, expected: np.ndarray, kind: str = "logits") -> dict[str, Any]:
    """The manifest's ``golden`` tolerances for outputs ``expected`` of a ``precision`` artifact.

    Every kind gets ``atol``/``rtol``; logits also the same top-1 class (``top1``), embeddings and
    features also a cosine floor (``min_cosine``: 0.9999 for fp32, 0.99 otherwise).
    """
    scale = float(np.abs(expected).max()) if expected.size else 1.0
    if precision == "fp32":
        rule: dict[str, Any] = {"atol": 1e-4 + 1e-4 * scale, "rtol": 1e-3}
    else:
        rule = {"atol": 0.05 * scale + 1e-3, "rtol": 0.05}
    rule["top1"] = kind == "logits"
    if kind != "logits":
        rule["kind"] = kind
    if kind in ("embedding", "features"):
        rule["min_cosine"] = 0.9999 if precision == "fp32" else 0.99
    return rule


def pick_golden(
    outputs: np.ndarray, atol: float, n: int = GOLDEN_SAMPLES, logits: bool = True
) -> np.ndarray:
    """Indices of ``n`` samples, in order, whose top-1 output leads the runner-up by > ``2 * atol``.

    Outputs that are not per-sample class scores (one value per sample, or ``logits=False``) keep
    the first ``n``; when fewer than ``n`` samples have such a lead, the ones with the largest
    leads fill the rest.
    """
    flat = outputs.reshape(len(outputs), -1) if outputs.ndim else outputs.reshape(1, 1)
    if flat.shape[1] < 2 or not logits:
        return np.arange(min(n, len(flat)))
    top2 = np.sort(flat, axis=1)[:, -2:]
    lead = top2[:, 1] - top2[:, 0]
    clear = np.flatnonzero(lead > 2 * atol)[:n]
    if len(clear) < n:
        rest = [i for i in np.argsort(-lead, kind="stable") if i not in set(clear)]
        clear = np.sort(np.concatenate([clear, rest[: n - len(clear)]]).astype(int))
    return clear


def make_golden(
    path: str | Path, inputs: np.ndarray, outputs: np.ndarray, **entry: Any
) -> dict[str, Any]:
    """Write ``golden.npz`` (``inputs`` and the ``outputs`` a device must reproduce) at ``path``.

    Returns:
        The manifest's ``golden`` entry: ``{"file": "golden.npz", **entry}`` (``entry``: the
        tolerances, ``top1``, ``holds_across``).
    """
    np.savez(path, inputs=np.asarray(inputs), outputs=np.asarray(outputs))
    return {"file": GOLDEN_FILE, **entry}


def read_golden(root: str | Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """A bundle's golden ``(inputs, outputs)`` (one input, one output) through
    :func:`member_path`, or None without any.

    Raises:
        BundleError: the golden file is unlisted, unsafe, missing, too large, pickled, or lacks
            the ``inputs``/``outputs`` arrays.
    """
    data = read_golden_all(root, manifest, ["input"], ["output"])
    return None if data is None else (data[0][0], data[1][0])


def read_golden_all(
    root: str | Path, manifest: Manifest, inputs: Sequence[str], outputs: Sequence[str]
) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """A bundle's golden inputs and expected outputs in model order (``inputs``/``outputs`` name
    them; ``edgesmith.runtime.outputs.golden_arrays``), or None without golden data.

    Raises:
        BundleError: as :func:`read_golden`; an array a model input or output needs is missing.
    """
    golden = manifest.golden
    if not golden or not golden.get("file"):
        return None
    rel = golden["file"]
    path = member_path(root, manifest, rel, "golden file")
    if path.stat().st_size > MAX_GOLDEN_BYTES:
        raise BundleError(
            f"golden file '{printable(rel)}' is larger than {MAX_GOLDEN_BYTES >> 20} MiB",
            hint="golden data is a few inputs; rebuild the bundle",
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            return golden_arrays(data, inputs, outputs)
    except KeyError as exc:
        raise BundleError(
            f"golden file '{printable(rel)}' has no {printable(str(exc))} array",
            hint="golden data holds 'inputs' and 'outputs' (or inputs/<name>, outputs/<name>); "
            "rebuild the bundle",
        ) from None
    except (ValueError, OSError, EOFError) as exc:
        raise BundleError(
            f"golden file '{printable(rel)}' is not a numpy archive of plain arrays "
            f"({printable(str(exc)[:160])})",
            hint="rebuild the bundle",
        ) from None


def remake_golden(
    root: str | Path, manifest: Manifest, run: Any, folder: str | Path
) -> tuple[Path, dict[str, Any]] | None:
    """New golden outputs for a bundle derived from ``root`` (same inputs, ``run(inputs)`` as the
    outputs), written into ``folder``; the absolute tolerance grows with the outputs' scale.

    Returns:
        ``(path of the new golden.npz, the manifest's new golden entry)`` (the entry names the
        same bundle path as before), or None without golden data.
    """
    data = read_golden(root, manifest)
    if data is None or manifest.golden is None:
        return None
    inputs, old = data
    outputs = np.asarray(run(inputs))
    entry = dict(manifest.golden)  # the same bundle path and settings
    ratio = float(np.abs(outputs).max() or 1.0) / float(np.abs(old).max() or 1.0)
    entry["atol"] = float(entry.get("atol", 1e-4)) * max(ratio, 1.0)
    path = Path(folder) / GOLDEN_FILE
    make_golden(path, inputs, outputs)
    return path, entry


@dataclass
class GoldenCheck:
    """How a model's outputs on the golden inputs compare with the expected ones."""

    ok: bool
    reason: str = ""
    max_abs_diff: float | None = None
    top1_agreement: float | None = None


def compare_golden(out: np.ndarray, expected: np.ndarray, golden: dict[str, Any]) -> GoldenCheck:
    """``out`` against ``expected`` within the manifest's ``golden`` tolerances (``atol``, ``rtol``,
    and with ``top1`` the same top-1 class on every sample)."""
    out, expected = np.asarray(out), np.asarray(expected)
    if out.shape != expected.shape:
        return GoldenCheck(
            False, f"golden output shape {list(out.shape)}, expected {list(expected.shape)}"
        )
    if not np.isfinite(out).all():
        return GoldenCheck(False, "the model returns NaN or Inf on its golden inputs")
    diff = np.abs(out.astype(np.float64) - expected.astype(np.float64))
    check = GoldenCheck(True, max_abs_diff=float(diff.max()) if diff.size else 0.0)
    atol, rtol = float(golden.get("atol", 1e-4)), float(golden.get("rtol", 1e-3))
    if out.ndim >= 2:
        flat_o, flat_e = out.reshape(len(out), -1), expected.reshape(len(expected), -1)
        check.top1_agreement = float((flat_o.argmax(1) == flat_e.argmax(1)).mean())
    if not np.allclose(out, expected, atol=atol, rtol=rtol):
        check.ok = False
        check.reason = (
            f"golden outputs differ by up to {check.max_abs_diff:.4g} "
            f"(tolerance atol {atol:.3g}, rtol {rtol:.3g})"
        )
    elif golden.get("top1") and check.top1_agreement is not None and check.top1_agreement < 1:
        check.ok = False
        check.reason = f"golden top-1 agreement {check.top1_agreement:.3f} < 1"
    return check


def check_golden(model: Any, root: str | Path) -> GoldenCheck | None:
    """Run a loaded bundle on its golden inputs and compare (None: the bundle has no golden data):
    one output as :func:`compare_golden`; several, or outputs with their own rules
    (``golden.outputs``), each by its kind (``edgesmith.runtime.outputs.compare_golden_outputs``).

    Raises:
        BundleError: the golden file is unlisted, unsafe, missing or malformed.
        EdgesmithError: the model refuses its golden inputs.
    """
    manifest = model.manifest
    if manifest is None or not manifest.golden:
        return None
    in_names = [s.name for s in model.inputs]
    out_names = [s.name for s in model.outputs]
    data = read_golden_all(root, manifest, in_names, out_names)
    if data is None:
        return None
    inputs, expected = data
    got = model(*inputs)
    outs = list(got) if isinstance(got, tuple) else [got]
    if len(outs) == 1 == len(expected) and not manifest.golden.get("outputs"):
        return compare_golden(np.asarray(outs[0]), expected[0], manifest.golden)
    r = compare_golden_outputs(outs, expected, manifest.golden, out_names)
    return GoldenCheck(r.ok, r.reason, r.max_abs_diff, r.top1_agreement)
