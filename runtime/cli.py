"""``edgesmith run`` and ``edgesmith bench``: the runtime from the command line (no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np

from edgesmith.errors import InputError
from edgesmith.options import field_option
from edgesmith.text import printable

__all__ = ["bench_cmd", "run_cmd", "serve_cmd"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def read_input_file(path: Path, gray: bool = False) -> np.ndarray:
    """An image file as a uint8 HWC array, or a ``.npy`` array as stored (never pickled objects)."""
    if not path.is_file():
        raise InputError(f"input file not found: {path}", hint="check the path")
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise InputError(
                f"cannot read {path}: {exc}", hint="save plain numeric arrays with np.save"
            ) from None
    if path.suffix.lower() in _IMAGE_SUFFIXES:
        try:
            from PIL import Image, UnidentifiedImageError
        except ImportError:
            raise InputError(
                "reading images needs Pillow", hint="pip install pillow, or pass .npy arrays"
            ) from None
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("L" if gray else "RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(
                f"cannot read image {path}: {exc}", hint="is the file a complete image?"
            ) from None
    raise InputError(
        f"unsupported input file {path.name}",
        hint=f"give images ({', '.join(sorted(_IMAGE_SUFFIXES))}) or .npy arrays",
    )


def read_named_inputs(path: Path) -> dict[str, np.ndarray]:
    """An ``.npz`` file's arrays by name (one per model input; never pickled objects)."""
    if not path.is_file():
        raise InputError(f"input file not found: {path}", hint="check the path")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (ValueError, OSError) as exc:
        raise InputError(
            f"cannot read {path}: {exc}",
            hint="save plain numeric arrays with np.savez(path, input_ids=..., attention_mask=...)",
        ) from None


def _predicts(model: Any) -> bool:
    """True when ``run`` prints labels: one input and class scores first."""
    first = model.outputs[0].name if model.outputs else ""
    return len(model.inputs) == 1 and model.output_kinds.get(first, "logits") == "logits"


def _shown(text: str) -> str:
    """``text`` with control characters escaped (names come from model files)."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _run_values(model: Any, files: tuple[Path, ...], as_json: bool) -> None:
    """Run ``.npz`` (named inputs) or ``.npy`` (one input) files and print every output."""
    results: list[dict[str, Any]] = []
    for f in files:
        if f.suffix.lower() == ".npz":
            outs = model.run(read_named_inputs(f))
        else:
            x = read_input_file(f)
            if x.dtype != np.uint8 and x.ndim == len(model.inputs[0].shape) - 1:
                x = x[None]
            got = model(x)
            values = list(got) if isinstance(got, tuple) else [got]
            outs = dict(zip([o.name for o in model.outputs], values, strict=True))
        results.append({"file": str(f), "outputs": {k: np.asarray(v) for k, v in outs.items()}})
    if as_json:
        doc = [
            {
                "file": r["file"],
                "outputs": {
                    k: {"shape": list(v.shape), "data": v.ravel().tolist()}
                    for k, v in r["outputs"].items()
                },
            }
            for r in results
        ]
        click.echo(json.dumps({"model": model.info, "results": doc}, indent=2))
        return
    for r in results:
        parts = []
        for k, v in r["outputs"].items():
            flat = v.ravel()
            head = ", ".join(f"{x:.4g}" for x in flat[:6]) + (", ..." if flat.size > 6 else "")
            parts.append(f"{_shown(k)} {list(v.shape)} [{head}]")
        click.echo(f"{_shown(r['file'])}: " + "; ".join(parts))


@click.command("run")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-k",
    "--top-k",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Labels to print per file.",
)
@click.option("--backend", default=None, help="Force a backend (onnxruntime, ...).")
@click.option(
    "--device", default="auto", show_default=True, help="auto, cpu, cuda, ... or a provider name."
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def run_cmd(
    model_path: Path,
    files: tuple[Path, ...],
    top_k: int,
    backend: str | None,
    device: str,
    threads: int | None,
    as_json: bool,
) -> None:
    """Predict on image or .npy FILES with MODEL (a bundle folder or a model file); print top-k labels.

    A model with several inputs takes ``.npz`` files (one array per input name); a model whose
    first output is not class scores (an embedding, regression values) prints its outputs."""
    from edgesmith.runtime import load

    model = load(model_path, device=device, threads=threads, backend=backend)
    if not _predicts(model) or any(f.suffix.lower() == ".npz" for f in files):
        _run_values(model, files, as_json)
        return
    gray = bool(model.manifest and (model.manifest.preprocess or {}).get("channels") == "GRAY")
    results: list[dict[str, Any]] = []
    for f in files:
        x = read_input_file(f, gray=gray)
        if x.dtype != np.uint8 and x.ndim == len(model.inputs[0].shape) - 1:
            x = x[None]
        top = model.predict(x, top_k=top_k)
        results.append(
            {
                "file": str(f),
                "top": [{"label": label, "probability": round(p, 6)} for label, p in top[0]],
            }
        )
    if as_json:
        click.echo(json.dumps({"model": model.info, "results": results}, indent=2))
        return
    for r in results:  # labels come from the bundle: control characters are escaped
        click.echo(
            f"{printable(r['file'])}: "
            + ", ".join(f"{printable(t['label'])} ({t['probability']:.3f})" for t in r["top"])
        )


def _thread_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int | None]:
    if value is None:
        return [None]
    try:
        threads = [int(t) for t in value.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of integers") from None
    if not threads or min(threads) < 1:
        raise click.BadParameter("thread counts must be positive integers, e.g. 1,2,4")
    return list(threads)


@click.command("bench")
@click.argument(
    "model_paths", metavar="MODEL...", nargs=-1, required=True, type=click.Path(path_type=Path)
)
@click.option(
    "-b",
    "--batch",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Offline scenario batch size.",
)
@click.option(
    "-n",
    "--runs",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Timed single-stream queries.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Untimed queries first.",
)
@click.option(
    "--offline-seconds",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Duration of the offline scenario.",
)
@click.option(
    "--threads",
    callback=_thread_list,
    default=None,
    help="Intra-op threads; a list sweeps them, e.g. 1,2,4.",
)
@click.option("--backend", default=None, help="Force a backend.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, ...")
@click.option(
    "--no-isolate",
    is_flag=True,
    help="Measure in this process (no cold start; RSS shared by all models).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of Markdown.")
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the JSON report here.",
)
@click.option(
    "--markdown",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the Markdown tables here.",
)
@click.option(
    "--plot",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write a PNG plot here (needs matplotlib).",
)
def bench_cmd(
    model_paths: tuple[Path, ...],
    batch: int,
    runs: int,
    warmup: int,
    offline_seconds: float,
    threads: list[int | None],
    backend: str | None,
    device: str,
    no_isolate: bool,
    as_json: bool,
    out: Path | None,
    markdown: Path | None,
    plot: Path | None,
) -> None:
    """Benchmark MODEL... (bundles or model files), MLPerf style, and compare them.

    \b
    Single stream (batch 1, p50/p90/p99 latency, queries/s) and offline (throughput at --batch)
    after a warm-up, per thread count; cold start, load time and peak RSS from a fresh process
    per model; ratios against the first MODEL. Random inputs: speed only, no accuracy.
    Example:
      edgesmith bench a.onnx b.tflite c.xml --threads 1,2 --markdown bench.md --plot bench.png
    """
    import importlib

    from edgesmith.fsutil import atomic_write_bytes
    from edgesmith.runtime.bench import BenchConfig, bench_models, plot_report, render_markdown

    for p in model_paths:
        if not p.exists():
            raise InputError(f"model not found: {p}", hint="give bundle folders or model files")
    cfg = BenchConfig(
        runs=runs,
        warmup=warmup,
        batch=batch,
        offline_seconds=offline_seconds,
        threads=threads,
        backend=backend,
        device=device,
        isolate=not no_isolate,
    )
    # imported by name: the console helpers are core code outside the runtime's type check
    track = importlib.import_module("edgesmith.progress").track
    report = bench_models(
        list(model_paths), cfg, progress=lambda items: track(items, "benchmarking")
    )
    text = render_markdown(report)
    if out is not None:
        atomic_write_bytes(out, (json.dumps(report, indent=2) + "\n").encode())
    if markdown is not None:
        atomic_write_bytes(markdown, text.encode())
    if plot is not None:
        plot_report(report, plot)
    click.echo(json.dumps(report, indent=2) if as_json else text)


def _serve_option(name: str, *decls: str, help: str, **attrs: Any) -> Any:
    """A ``serve`` option made from the ``ServeConfig`` field ``name`` (type, bounds, default)."""
    from edgesmith.runtime.serve.server import ServeConfig

    flag = ServeConfig.model_fields[name].annotation is bool
    return field_option(ServeConfig, name, *decls, help=help, show_default=not flag, **attrs)


@click.command("serve")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@_serve_option("host", help="Address to bind (loopback unless told).")
@_serve_option("port", help="Port (0: any free one).")
@_serve_option("max_batch", help="Most samples per batch; 1 disables micro-batching.")
@_serve_option("max_wait_ms", help="How long a batch waits to fill.")
@_serve_option("max_queue", help="Requests waiting before 503.")
@_serve_option(
    "timeout_ms",
    help="Default per-request deadline (504); a request's 'timeout' parameter (µs) overrides it.",
)
@_serve_option("max_body_bytes", "--max-body-mb", scale=1 << 20, help="Request body limit (413).")
@_serve_option(
    "body_timeout_s",
    "--body-timeout",
    help="Seconds a client may take to send a request body (408).",
)
@_serve_option("max_connections", help="Concurrent connections before 503.")
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Require 'Authorization: Bearer <token>' with the token in this file (or in $EDGESMITH_TOKEN).",
)
@_serve_option("nan_policy", help="Reject (422) or pass NaN/Inf inputs.")
@_serve_option(
    "watch", help="Re-resolve MODEL (e.g. an OTA 'current' link) and hot-swap when it changes."
)
@_serve_option("watch_interval_s", "--watch-interval", help="Seconds between --watch checks.")
@_serve_option("device", help="auto, cpu, cuda, tensorrt, gpu, npu, ...")
@_serve_option("threads", help="Intra-op threads of the model.")
@_serve_option("backend", help="Force a backend (onnxruntime, openvino, litert).")
@_serve_option(
    "drain_timeout_s", "--drain-timeout", help="Seconds SIGTERM waits for requests in flight."
)
@_serve_option(
    "inference_nice",
    help="Nice value of the inference thread (Linux): reading requests and shedding load go first when the CPU is short; 0 treats them alike.",
)
@click.option(
    "--key",
    "keys",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Trusted public key (NAME.pub) or folder of *.pub: a signed bundle must verify "
    "against one, at start and on every hot swap; repeatable.",
)
@_serve_option(
    "require_signature",
    help="Serve signed bundles only (needs --key); unsigned bundles and bare model files are refused.",
)
@click.option(
    "--ready-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the bound port here once listening.",
)
def serve_cmd(
    model_path: Path,
    token_file: Path | None,
    keys: tuple[Path, ...],
    ready_file: Path | None,
    **options: Any,
) -> None:
    """Serve MODEL (a bundle, a model file, or a link to one) over the Open Inference Protocol v2.

    \b
    KServe/Triton REST endpoints: /v2/health/{live,ready}, /v2/models/NAME[/ready|/infer], and
    Prometheus /metrics. NAME is the bundle manifest's name, else the file stem.
    Example:
      edgesmith serve out/bundles/fmnist-cnn-onnx-fp32 --port 8000
      curl localhost:8000/v2/models/fmnist-cnn
      edgesmith serve /var/lib/edgesmith/current --watch --key release.pub --require-signature
    """
    import logging
    import os

    from edgesmith.runtime.serve import Server

    token = os.environ.get("EDGESMITH_TOKEN") or None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InputError(
                f"cannot read token file {token_file}: {exc.strerror}", hint="check the path"
            ) from None
        if not token:
            raise InputError(f"token file {token_file} is empty", hint="write the token into it")
    if options.get("require_signature") and not keys:
        raise InputError(
            "--require-signature needs the publisher's public key to check signatures with",
            hint="add --key NAME.pub (the file `edgesmith keygen` wrote next to NAME.key)",
        )
    if logging.getLogger().getEffectiveLevel() <= logging.WARNING:  # not -q: show swaps
        logging.getLogger("edgesmith.runtime.serve").setLevel(logging.INFO)
    config = {k: v for k, v in options.items() if v is not None}
    config.update(token=token, trusted_keys=[str(k) for k in keys])
    Server(model_path, **config).run(ready_file=ready_file)
