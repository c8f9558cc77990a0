"""Part 3 of ``finetune_effnet.py``: classes added in steps with and without replay and
distillation (accuracy per step on the classes seen so far), and the plot of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def incremental_run(
    f: np.ndarray,
    y: np.ndarray,
    ft: np.ndarray,
    yt: np.ndarray,
    labels: list[str],
    args: Any,
    seed: int,
) -> dict[str, Any]:
    """One seed: a fresh 5-class head learns classes 0-4, then 5 batches of one new class each."""
    from edgesmith.runtime.finetune.head import Head, LayerSpec
    from edgesmith.runtime.finetune.incremental import IncrementalLearner
    from edgesmith.runtime.finetune.training import (
        FinetuneConfig,
        evaluate_head,
        feature_stats,
        init_like,
        stratified_split,
        train_head,
    )

    first = list(range(5))
    shape = Head.from_arrays(
        [LayerSpec(type="linear", in_features=f.shape[1], out_features=5)],
        {"layers.0.weight": np.zeros((5, f.shape[1])), "layers.0.bias": np.zeros(5)},
    )
    start = init_like(shape, np.random.default_rng(seed))
    cfg = FinetuneConfig(
        epochs=args.inc_epochs, lr=args.inc_lr, patience=5, distill=args.distill, seed=seed
    )
    names, tnames = np.array(labels)[y], np.array(labels)[yt]
    batches = [np.flatnonzero(y < 5)] + [np.flatnonzero(y == c) for c in range(5, 10)]
    runs: dict[str, Any] = {}
    for tag, capacity, kd in (("replay", args.replay, args.distill), ("no_replay", 0, 0.0)):
        c = cfg.model_copy(update={"distill": kd})
        learner = IncrementalLearner(start, labels[:5], c, capacity=capacity, seed=seed)
        curve = []
        for b in batches:
            rep = learner.learn(f[b], names[b], ft, tnames)
            pc = learner.evaluate(ft, tnames)["per_class"]
            among = learner.evaluate(ft, tnames, among=first)["per_class"]
            curve.append(
                {
                    **rep.to_json(),
                    "first_classes": float(np.mean([pc[c] for c in first])),
                    "first_classes_among_first": float(np.mean([among[c] for c in first])),
                    "all_classes": float(np.mean([v for v in pc if v is not None])),
                }
            )
        runs[tag] = {"capacity": capacity, "distill": kd, "steps": curve}
    # the reference: one head trained on all batches at once, with the same settings
    joint = init_like(
        shape.add_classes(5, np.random.default_rng(seed)), np.random.default_rng(seed)
    )
    joint = joint.renormalize(*feature_stats(f))
    tr, va = stratified_split(y, cfg.val_fraction, seed)
    plain = cfg.model_copy(update={"distill": 0.0})
    jh = train_head(joint, f[tr], y[tr], plain, val=(f[va], y[va]), description="joint").head
    jpc = evaluate_head(jh, ft, yt)["per_class"]
    jam = evaluate_head(jh, ft, yt, among=first)["per_class"]
    s = runs["replay"]["steps"]
    return {
        "seed": seed,
        "runs": runs,
        "joint": {
            "first_classes": float(np.mean([jpc[c] for c in first])),
            "first_classes_among_first": float(np.mean([jam[c] for c in first])),
            "all_classes": float(np.mean(jpc)),
        },
        "drop_points_10way": 100 * (s[0]["first_classes"] - s[-1]["first_classes"]),
        "drop_points_among_first": 100
        * (s[0]["first_classes_among_first"] - s[-1]["first_classes_among_first"]),
        "drop_points_no_replay_10way": 100
        * (
            runs["no_replay"]["steps"][0]["first_classes"]
            - runs["no_replay"]["steps"][-1]["first_classes"]
        ),
    }


def incremental(
    f: np.ndarray, y: np.ndarray, ft: np.ndarray, yt: np.ndarray, labels: list[str], args: Any
) -> dict[str, Any]:
    per_seed = [incremental_run(f, y, ft, yt, labels, args, seed) for seed in args.seeds]

    def stat(key: str) -> dict[str, float]:
        v = np.array([r[key] for r in per_seed])
        return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}

    return {
        "first_classes": [labels[c] for c in range(5)],
        "batches": [int((y < 5).sum())] + [int((y == c).sum()) for c in range(5, 10)],
        "test": len(yt),
        "replay_capacity": args.replay,
        "distill": args.distill,
        "epochs": args.inc_epochs,
        "lr": args.inc_lr,
        "seeds": args.seeds,
        "drop_points_10way": stat("drop_points_10way"),
        "drop_points_among_first": stat("drop_points_among_first"),
        "drop_points_no_replay_10way": stat("drop_points_no_replay_10way"),
        "per_seed": per_seed,
    }


def plot(inc: dict[str, Any], path: Path) -> None:
    """Accuracy on the first classes after every batch, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    runs = inc["per_seed"]
    steps = range(len(runs[0]["runs"]["replay"]["steps"]))

    def mean(tag: str, key: str) -> list[float]:
        return [float(np.mean([r["runs"][tag]["steps"][i][key] for r in runs])) for i in steps]

    for tag, style in (("replay", "-o"), ("no_replay", "--x")):
        ax.plot(steps, mean(tag, "first_classes"), style, label=f"{tag}: 10-way")
        ax.plot(
            steps,
            mean(tag, "first_classes_among_first"),
            style,
            alpha=0.45,
            label=f"{tag}: among classes 0-4",
        )
    joint = float(np.mean([r["joint"]["first_classes"] for r in runs]))
    joint_among = float(np.mean([r["joint"]["first_classes_among_first"] for r in runs]))
    ax.axhline(joint, color="gray", ls=":", label="joint training: 10-way")
    ax.axhline(
        joint_among, color="gray", ls="-.", alpha=0.6, label="joint training: among classes 0-4"
    )
    ax.set_xticks(list(steps), ["0-4"] + [f"+{c}" for c in range(5, 10)])
    ax.set_xlabel("arriving batch (classes)")
    ax.set_ylabel("top-1 on classes 0-4")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(
        f"EfficientNet-Lite0 features, class-incremental Fashion-MNIST (replay {inc['replay_capacity']}, "
        f"{len(runs)} seeds)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
