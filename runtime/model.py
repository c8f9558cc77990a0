"""``load()`` and ``Model``: numpy in, numpy out, on whichever backend runs the file."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import BundleError, EdgesmithError, InputError, ModelLoadError
from edgesmith.runtime.backends import Session, backend_for, get_backend
from edgesmith.runtime.bundle import KeySource, Manifest, read_bundle
from edgesmith.runtime.bundle.files import (
    check_model_references,
    model_references,
    model_references_from,
)
from edgesmith.runtime.specs import (
    NanPolicy,
    TensorSpec,
    check_input,
    check_shared_dims,
    fit_input,
    preprocess_images,
)
from edgesmith.text import printable

__all__ = ["Model", "load"]

log = logging.getLogger(__name__)

NAN_POLICIES = ("error", "allow")


class Model:
    """A loaded model. Call it with numpy arrays; it returns numpy arrays.

    Attributes:
        name: the bundle manifest's ``name``, else the model file's stem.
        version: the manifest's ``version``, else None.
        inputs, outputs: TensorSpec lists (symbolic dims are strings).
        info: what actually runs: backend, provider/device/delegate, precision, threads, file.
        manifest: the bundle manifest, or None for a bare model file.
        labels: class names from the manifest, if any.
    """

    def __init__(
        self,
        session: Session,
        manifest: Manifest | None = None,
        nan_policy: NanPolicy = "error",
        path: Path | None = None,
        model_file: Path | None = None,
        weights: str | None = None,
    ) -> None:
        if nan_policy not in NAN_POLICIES:
            raise EdgesmithError(
                f"unknown nan_policy '{nan_policy}'", hint=f"use one of: {', '.join(NAN_POLICIES)}"
            )
        self._session = session
        self.manifest = manifest
        self.nan_policy = nan_policy
        self.inputs: list[TensorSpec] = session.inputs
        self.outputs: list[TensorSpec] = session.outputs
        self.labels: list[str] | None = manifest.labels if manifest else None
        stem = Path(model_file or path or "model").stem
        self.name: str = manifest.name if manifest else stem
        self.version: int | None = manifest.version if manifest else None
        self._pre = manifest.preprocess if manifest else None
        # how inputs are fitted to the file (pad/cut a fixed sequence length, cast int64 ids):
        # the manifest's input entries, or declare_inputs() for a bare file
        self.input_rules: dict[str, dict[str, Any]] = {}
        # the recipe's input names where the file's differ (TFLite: serving_default_args_0)
        self.input_aliases: dict[str, str] = {}
        if manifest:
            self.declare_inputs(manifest.inputs)
        self.output_kinds: dict[str, str] = {
            str(o.get("name")): str(o["kind"])
            for o in (manifest.outputs if manifest else [])
            if isinstance(o, dict) and "kind" in o
        }
        self.info: dict[str, Any] = {
            **session.info,
            "precision": session.info.get("precision")
            or (manifest.precision if manifest else None)
            or weights
            or "unknown",
            "weights": weights or (manifest.precision if manifest else "unknown"),
            "path": str(path) if path else None,
            "file": str(model_file) if model_file else None,
            "name": self.name,
            "version": self.version,
            "nan_policy": nan_policy,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
        }

    @property
    def batchable(self) -> bool:
        """True when every input has a symbolic batch dimension (requests can be stacked)."""
        return all(s.batched for s in self.inputs)

    def declare_inputs(self, entries: list[dict[str, Any]]) -> None:
        """Say how inputs fit this model (manifest input entries: ``pad``, ``dims``,
        ``cast_from``; see :func:`~edgesmith.runtime.specs.fit_input`)."""
        keys = ("pad", "dims", "cast_from")
        for e in entries:
            if isinstance(e, dict) and any(k in e for k in keys):
                self.input_rules[str(e.get("name"))] = {k: e[k] for k in keys if k in e}
            if isinstance(e, dict) and isinstance(e.get("alias"), str):
                self.input_aliases[e["alias"]] = str(e.get("name"))

    def prepare(self, x: Any, spec: TensorSpec) -> np.ndarray:
        """Check one input against ``spec`` (preprocessing uint8 images as the manifest says,
        padding/cutting and casting as its input entry allows)."""
        rule = self.input_rules.get(spec.name)
        if rule:
            x = fit_input(x, spec, rule)
        if (
            self._pre
            and isinstance(x, np.ndarray)
            and x.dtype == np.uint8
            and spec.dtype != "uint8"
        ):
            x = preprocess_images(x, self._pre, spec)
        return check_input(x, spec, self.nan_policy)

    def prepare_all(self, arrays: Sequence[Any]) -> list[np.ndarray]:
        """:meth:`prepare` every input (in model order) and check that inputs sharing a
        dimension (the batch, a sequence length) agree on its size.

        Raises:
            InputError: an input that does not fit, or shared dimensions of different sizes.
        """
        out = [self.prepare(a, s) for a, s in zip(arrays, self.inputs, strict=True)]
        check_shared_dims(out, self.inputs, self.input_rules)
        return out

    def run_checked(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Run inputs that already passed :meth:`prepare` (one per model input, in order)."""
        return self._session.run({s.name: a for s, a in zip(self.inputs, arrays, strict=True)})

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """Run with named inputs (the file's names, or the recipe's where the manifest gives
        them as ``alias``); returns named outputs."""
        names = {s.name for s in self.inputs}
        if self.input_aliases and set(feeds) != names:
            feeds = {self.input_aliases.get(k, k): v for k, v in feeds.items()}
        if set(feeds) != names:
            also = sorted(self.input_aliases)
            raise InputError(
                f"inputs given: {sorted(feeds)}; the model takes {sorted(names)}"
                + (f" (or by the recipe's names {also})" if also else ""),
                hint="pass one array per model input, by name",
            )
        prepared = self.prepare_all([feeds[s.name] for s in self.inputs])
        arrays = {s.name: a for s, a in zip(self.inputs, prepared, strict=True)}
        return dict(zip([o.name for o in self.outputs], self._session.run(arrays), strict=True))

    def __call__(self, *args: Any) -> Any:
        """Run with positional inputs; returns one array, or a tuple for several outputs.

        A uint8 image (HWC) or batch (NHWC) is preprocessed as the bundle manifest says.
        """
        inputs = self.inputs
        if len(args) != len(inputs):
            raise InputError(
                f"got {len(args)} inputs, the model takes {len(inputs)} ({', '.join(s.name for s in inputs)})",
                hint="pass one array per model input",
            )
        if len(inputs) == 1:
            spec = inputs[0]
            outs = self._session.run({spec.name: self.prepare(args[0], spec)})
        else:
            prepared = self.prepare_all(args)
            outs = self._session.run({s.name: a for s, a in zip(inputs, prepared, strict=True)})
        return outs[0] if len(outs) == 1 else tuple(outs)

    def predict(self, x: Any, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k (label, probability) per sample, from softmax over the first output.

        Raises:
            InputError: the first output is not class logits (the manifest says its kind).
        """
        first = self.outputs[0].name if self.outputs else ""
        kind = self.output_kinds.get(first, "logits")
        if kind != "logits":
            raise InputError(
                f"output '{first}' is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not class "
                "scores: there are no labels to predict",
                hint="call the model (model(x) or model.run({...})) for its values",
            )
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

    # ------------------------------------------------------------------ trainable head
    # (bundles whose manifest has ``trainable_head``: see runtime/head.py and runtime/finetune.py)

    @property
    def head(self) -> Any:
        """The numpy :class:`~edgesmith.runtime.finetune.head.Head` of a trainable-head bundle, else None."""
        return getattr(self._session, "head", None)

    def features(self, x: Any) -> np.ndarray:
        """The backbone's output (the head's input) for ``x``, prepared as for :meth:`__call__`.

        Raises:
            BundleError: the model has no trainable head.
        """
        from edgesmith.runtime.finetune import require_head

        require_head(self)
        spec = self.inputs[0]
        return self._session.features({spec.name: self.prepare(x, spec)})

    def finetune(self, x: Any, y: Any, **kwargs: Any) -> Any:
        """Train the head on ``(x, y)`` on this device (numpy only); see
        :func:`edgesmith.runtime.finetune.finetune_model` for the arguments.

        Returns:
            A :class:`~edgesmith.runtime.finetune.FinetuneResult` (the new head, metrics, history
            and, with ``out=``, the new bundle version). This model is left unchanged.
        """
        from edgesmith.runtime.finetune import finetune_model

        return finetune_model(self, x, y, **kwargs)

    def __repr__(self) -> str:
        return f"Model({self.name!r}, backend={self.info.get('backend')}, provider={self.info.get('provider')}, precision={self.info.get('precision')})"


def _profile(target: str) -> Any:
    try:
        from edgesmith.runtime.profiles import load_profile

        return load_profile(target)
    except EdgesmithError:
        log.warning("bundle target '%s' is not a known profile; using defaults", printable(target))
        return None


def _profile_options(profile: Any, backend: str, device: str) -> tuple[str, dict[str, Any]]:
    """Device and backend options a bundle's target profile asks for when ``device`` is auto."""
    if profile is None or device != "auto":
        return device, {}
    if backend == "onnxruntime" and profile.providers:
        opts: dict[str, Any] = {"providers": list(profile.providers)}
        if getattr(profile, "require_accelerator", False):
            opts["require_accelerator"] = profile.name
        return device, opts
    if backend == "openvino" and profile.ov_device:
        return profile.ov_device.lower(), {"fallback_device": "cpu"}
    return device, {}


def load(
    path: str | Path,
    device: str = "auto",
    threads: int | None = None,
    backend: str | None = None,
    nan_policy: NanPolicy = "error",
    verify: bool = True,
    options: dict[str, Any] | None = None,
    *,
    trusted_keys: KeySource | None = None,
    require_signature: bool = False,
) -> Model:
    """Load a bundle folder or a bare model file (``.onnx``, ``.tflite``, OpenVINO ``.xml``).

    Args:
        path: a bundle folder (verified before use) or a model file; links are followed.
        device: ``auto``, ``cpu``, ``cuda``, ``tensorrt``, ``gpu``, ``npu``, ``edgetpu``, or a
            backend-specific name (an onnxruntime execution provider, an OpenVINO device).
        threads: intra-op threads; None takes the bundle target's setting or the backend default.
        backend: force ``onnxruntime``, ``openvino`` or ``litert``; None picks from the bundle
            target, else the first installed backend that runs the file type.
        nan_policy: ``error`` rejects NaN/Inf inputs with an InputError; ``allow`` passes them on.
        verify: check bundle file sizes and hashes (leave on outside tests).
        options: backend options: ``precision`` (OpenVINO inference precision, default ``f32``;
            ``fp16`` for TensorRT), ``delegate`` (LiteRT delegate library path), ``providers``
            (onnxruntime provider order), ``provider_options``, ``session_config``.
        trusted_keys: public key files (``NAME.pub``), folders of them, or ``{key id: raw key}``:
            a bundle's signature must verify against one of them (checked before anything else
            in the bundle is read). An unsigned bundle still loads, with a warning, unless
            ``require_signature``.
        require_signature: refuse unsigned bundles and bare model files (a device's policy);
            needs ``trusted_keys``.

    Returns:
        A :class:`Model`; ``model.info`` says which backend, provider and precision run.

    Raises:
        ModelLoadError: missing, empty, truncated or unsafe model file (e.g. ONNX external data
            outside the model's folder). BundleError: a bundle that fails verification (bad or
            untrusted signature, an unsigned bundle under ``require_signature``, a file the
            model uses that its manifest does not list).

    Example:
        >>> model = load("out/bundles/fmnist-cnn-onnx-fp32")      # doctest: +SKIP
        >>> model.predict(image_uint8, top_k=3)                    # doctest: +SKIP
        >>> load("current", trusted_keys=["/etc/edgesmith/release.pub"], require_signature=True)  # doctest: +SKIP
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(
            f"model not found: {printable(p)}",
            hint="give a bundle folder or a .onnx, .tflite or .xml file",
        )
    if require_signature and not trusted_keys:
        raise BundleError(
            "require_signature needs the trusted public keys to check signatures with",
            hint="pass trusted_keys=[NAME.pub] (edgesmith serve: --key NAME.pub)",
        )
    opts = dict(options or {})
    manifest = None
    profile = None
    if require_signature and not p.is_dir():
        raise BundleError(
            f"{printable(p)} is a bare model file, and only signed bundles are accepted here",
            hint="bundle and sign it: edgesmith bundle create MODEL -o OUT --sign-key NAME.key ...",
        )
    if p.is_dir():
        manifest = read_bundle(
            p, verify=verify, trusted_keys=trusted_keys, require_signature=require_signature
        )
        model_file = p / manifest.model
        profile = _profile(manifest.target)
        if threads is None and profile is not None:
            threads = profile.threads
        preferred = backend or (profile.backend if profile else None)
        try:
            name = backend_for(model_file, preferred, device)
        except EdgesmithError:
            name = backend_for(model_file, backend, device)
    else:
        model_file = p
        name = backend_for(p, backend, device)
    if not model_file.is_file():
        raise ModelLoadError(f"model file not found: {model_file}", hint="check the path")
    if model_file.stat().st_size == 0:
        raise ModelLoadError(
            f"{model_file} is empty", hint="the file is truncated; export or download it again"
        )
    weights = None
    refs: list[str] = []
    if model_file.suffix.lower() == ".onnx":
        from edgesmith.runtime.onnxfile import scan_onnx

        scan = scan_onnx(model_file)
        weights = scan.precision
        if manifest is not None:
            refs = model_references_from(manifest.model, scan.external)
    elif manifest is not None:
        refs = model_references(p, manifest.model)
    if manifest is not None:
        check_model_references(p, manifest, refs)
    device, profile_opts = _profile_options(profile, name, device)
    session = get_backend(name).open_session(
        model_file, device=device, threads=threads, options={**profile_opts, **opts}
    )
    if manifest is not None and manifest.trainable_head:  # backbone here, head in numpy
        from edgesmith.runtime.finetune.head import HeadSession, load_head

        head = load_head(p, manifest.trainable_head)
        session = HeadSession(session, head, manifest.trainable_head)
    return Model(
        session,
        manifest=manifest,
        nan_policy=nan_policy,
        path=p,
        model_file=model_file,
        weights=weights or session.info.get("weights"),
    )
