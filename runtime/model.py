"""``load()`` and ``Model``: numpy in, numpy out, on whichever backend runs the file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import EdgesmithError, InputError, ModelLoadError
from edgesmith.runtime.backends import Session, backend_for, get_backend
from edgesmith.runtime.bundle import Manifest, read_bundle
from edgesmith.runtime.specs import NanPolicy, TensorSpec, check_input, preprocess_images

__all__ = ["Model", "load"]

log = logging.getLogger(__name__)


class Model:
    """A loaded model. Call it with numpy arrays; it returns numpy arrays.

    Attributes:
        inputs, outputs: TensorSpec lists (symbolic dims are strings).
        info: what actually runs: backend, provider/device, precision, threads, file.
        manifest: the bundle manifest, or None for a bare model file.
        labels: class names from the manifest, if any.
    """

    def __init__(
        self,
        session: Session,
        manifest: Manifest | None = None,
        nan_policy: NanPolicy = "error",
        path: Path | None = None,
    ) -> None:
        self._session = session
        self.manifest = manifest
        self.nan_policy = nan_policy
        self.inputs: list[TensorSpec] = session.inputs
        self.outputs: list[TensorSpec] = session.outputs
        self.labels: list[str] | None = manifest.labels if manifest else None
        self.info: dict[str, Any] = {
            **session.info,
            "precision": manifest.precision if manifest else "unknown",
            "path": str(path) if path else None,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
        }

    def _prepare(self, x: Any, spec: TensorSpec) -> np.ndarray:
        pre = self.manifest.preprocess if self.manifest else None
        if pre and isinstance(x, np.ndarray) and x.dtype == np.uint8 and spec.dtype != "uint8":
            x = preprocess_images(x, pre, spec)
        return check_input(x, spec, self.nan_policy)

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """Run with named inputs; returns named outputs."""
        names = {s.name for s in self.inputs}
        if set(feeds) != names:
            raise InputError(
                f"inputs given: {sorted(feeds)}; the model takes {sorted(names)}",
                hint="pass one array per model input, by name",
            )
        arrays = {s.name: self._prepare(feeds[s.name], s) for s in self.inputs}
        return dict(zip([o.name for o in self.outputs], self._session.run(arrays), strict=True))

    def __call__(self, *args: Any) -> Any:
        """Run with positional inputs; returns one array, or a tuple for several outputs.

        A uint8 image (HWC) or batch (NHWC) is preprocessed as the bundle manifest says.
        """
        if len(args) != len(self.inputs):
            raise InputError(
                f"got {len(args)} inputs, the model takes {len(self.inputs)} ({', '.join(s.name for s in self.inputs)})",
                hint="pass one array per model input",
            )
        feeds = {s.name: self._prepare(a, s) for s, a in zip(self.inputs, args, strict=True)}
        outs = self._session.run(feeds)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def predict(self, x: Any, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k (label, probability) per sample, from softmax over the first output."""
        logits = np.asarray(
            self(x) if len(self.inputs) == 1 else self.run(x)[self.outputs[0].name],
            dtype=np.float64,
        )
        logits = logits.reshape(logits.shape[0], -1)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        labels = self.labels or [str(i) for i in range(probs.shape[1])]
        top = np.argsort(-probs, axis=1)[:, :top_k]
        return [
            [(labels[j] if j < len(labels) else str(j), float(p[j])) for j in row]
            for p, row in zip(probs, top, strict=True)
        ]

    def __repr__(self) -> str:
        return f"Model({self.info.get('path')!r}, backend={self.info.get('backend')}, provider={self.info.get('provider')})"


def _profile_runtime(target: str) -> tuple[str | None, int | None]:
    try:
        from edgesmith.devices.profiles import load_profile

        prof = load_profile(target)
        return prof.backend, prof.threads
    except EdgesmithError:
        log.warning("bundle target '%s' is not a known profile; using defaults", target)
        return None, None


def load(
    path: str | Path,
    device: str = "auto",
    threads: int | None = None,
    backend: str | None = None,
    nan_policy: NanPolicy = "error",
    verify: bool = True,
) -> Model:
    """Load a bundle folder or a bare model file (``.onnx``) for inference.

    Args:
        path: a bundle folder (verified before use) or a model file.
        device: ``auto``, ``cpu``, ``cuda``, ... or a backend-specific device name.
        threads: intra-op threads; None takes the bundle target's setting or the backend default.
        backend: force a backend (``onnxruntime``); None picks from the bundle target or the file type.
        nan_policy: ``error`` rejects NaN/Inf inputs; ``allow`` passes them through.
        verify: check bundle file sizes and hashes (leave on outside tests).

    Example:
        >>> model = load("out/bundles/fmnist-cnn-onnx-fp32")      # doctest: +SKIP
        >>> model.predict(image_uint8, top_k=3)                    # doctest: +SKIP
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model not found: {p}", hint="give a bundle folder or a .onnx file")
    manifest = None
    if p.is_dir():
        manifest = read_bundle(p, verify=verify)
        model_file = p / manifest.model
        preferred, profile_threads = _profile_runtime(manifest.target)
        threads = threads if threads is not None else profile_threads
        try:
            name = backend_for(model_file, backend or preferred)
        except EdgesmithError:
            name = backend_for(model_file, backend)
    else:
        model_file = p
        name = backend_for(p, backend)
    if model_file.stat().st_size == 0:
        raise ModelLoadError(
            f"{model_file} is empty", hint="the file is truncated; export or download it again"
        )
    session = get_backend(name).open_session(model_file, device=device, threads=threads)
    return Model(session, manifest=manifest, nan_policy=nan_policy, path=p)
