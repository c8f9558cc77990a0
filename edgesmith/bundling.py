"""The build's output (``edgesmith.pipeline.build``): which formats a ``keep_going`` build
writes, and each artifact's bundle (its golden samples, and a trainable head's arrays).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.checks import Check, failed
from edgesmith.export.evaluate import Artifact, artifact_outputs, feed_names, inputs_manifest

__all__ = ["GOLDEN_CANDIDATES"]

GOLDEN_CANDIDATES = 64  # evaluation inputs the golden samples are picked from (runtime/golden.py)


def _dropped_formats(
    stage_checks: list[Check], by_format: dict[str, list[Check]]
) -> dict[str, list[str]]:
    """The formats to leave out of a ``keep_going`` build (format -> its failed checks), or {}
    when the stages failed (nothing can be kept) or no format passed."""
    if failed(stage_checks):
        return {}
    bad = {fmt: [str(c) for c in failed(cs)] for fmt, cs in by_format.items() if failed(cs)}
    if not bad or len(bad) == len(by_format):
        return {}
    return bad


def _write_bundle(
    out: Path,
    art: Artifact,
    p: Any,  # the build's Prepared (edgesmith.pipeline)
    version: int,
    golden_inputs: Any,
    sign_key: Any = None,
    head: Any = None,
    memory: Any = None,
) -> str:
    from edgesmith.feeds import Samples
    from edgesmith.runtime import load
    from edgesmith.runtime.bundle import new_manifest, write_bundle
    from edgesmith.runtime.golden import HOLDS_ACROSS, golden_tolerance, pick_golden

    model = load(art.path, device="cpu", threads=p.threads)
    ins_manifest = inputs_manifest(model, p.layouts)
    model.declare_inputs(ins_manifest)
    # the candidates as one padded batch: what is stored is exactly what was run
    in_names = feed_names(model, p.layouts)
    stored = Samples.of(golden_inputs).arrays()  # recipe order, padded to the longest
    expected = artifact_outputs(model, Samples(stored, in_names), head, names=in_names)
    kinds = list(p.outputs.kinds)
    rules = [golden_tolerance(art.precision, e, k) for e, k in zip(expected, kinds, strict=True)]
    lead = next((j for j, k in enumerate(kinds) if k == "logits"), 0)
    chosen = pick_golden(expected[lead], rules[lead]["atol"], logits=kinds[lead] == "logits")
    rel = f"bundles/{art.path.stem}"
    golden_file = out / ".work" / f"golden-{art.path.stem}.npz"
    golden_file.parent.mkdir(parents=True, exist_ok=True)
    out_names = [s.name for s in model.outputs] if head is None else ["logits"]
    if len(in_names) == 1 and len(expected) == 1:
        np.savez(golden_file, inputs=stored[0][chosen], outputs=expected[0][chosen])
    else:
        np.savez(
            golden_file,
            **{f"inputs/{n}": a[chosen] for n, a in zip(in_names, stored, strict=True)},
            **{f"outputs/{n}": e[chosen] for n, e in zip(out_names, expected, strict=True)},
        )
    golden = {"file": "golden.npz", **rules[0], "holds_across": HOLDS_ACROSS}
    golden.pop("kind", None)
    if len(rules) > 1 or kinds[0] != "logits":
        golden["outputs"] = [{"name": n, **r} for n, r in zip(out_names, rules, strict=True)]
    files = {f.name: f for f in art.files}
    files["golden.npz"] = golden_file
    out_specs = [s.to_json() for s in model.outputs]
    if len(kinds) > 1 or kinds[0] != "logits":
        for spec, kind in zip(out_specs, kinds, strict=True):
            spec["kind"] = kind
    manifest = new_manifest(
        p.recipe.name,
        version,
        p.profile.name,
        art.format,
        art.precision,
        art.path.name,
        ins_manifest,
        out_specs,
        build={"recipe": p.recipe.name},
        preprocess=p.data.preprocess,
        labels=p.data.labels,
        golden=golden,
        metrics={
            "metric": p.recipe.metric,
            "accuracy": art.accuracy,
            "latency_ms": art.latency_ms,
            "size_bytes": art.size_bytes,
            "parity": art.parity.to_json(),
        },
    )
    if head is not None:
        _add_head(manifest, files, head, model.outputs[0].name, p, out)
        if memory is not None:  # the build classes' exemplars and held-out samples
            from edgesmith.exemplars import add_memory

            add_memory(manifest, files, memory, model, head, out / ".work", art)
    write_bundle(out / rel, manifest, files, sign_key=sign_key)
    return rel


def _add_head(
    manifest: dict[str, Any],
    files: dict[str, Path],
    head: Any,
    feature_output: str,
    p: Any,  # the build's Prepared (edgesmith.pipeline)
    out: Path,
) -> None:
    """A trainable-head bundle: the head's arrays, its manifest entry, and logits as the output."""
    from edgesmith.runtime.finetune.head import HEAD_FILE

    cfg = p.recipe.trainable_head
    assert cfg is not None
    path = head.save(out / ".work" / HEAD_FILE)
    files[HEAD_FILE] = path
    manifest["outputs"] = [{"name": "logits", "shape": ["batch", head.classes], "dtype": "float32"}]
    manifest["trainable_head"] = head.spec(
        feature_output,
        policy=cfg.policy,
        trained={
            "by": "build",
            "at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "recipe": p.recipe.name,
            "module": cfg.module,
        },
    )
