"""``edgesmith finetune BUNDLE --data DIR``: train a bundle's head on the device (no torch).

Reads a labelled image folder, trains the head in numpy (runtime/finetune/workflow.py), writes the next
bundle version, and with ``--activate`` installs it through the OTA agent's health-checked A/B
switch, refusing it if it is worse on the held-out split than the installed head.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import click

from edgesmith.errors import BundleError, CheckFailed, EdgesmithError

__all__ = ["finetune_cmd"]


def _summary(result: Any, out: Path | None) -> str:
    m = result.metrics
    lines = [
        f"epochs {len(result.history)} (best {result.trained['best_epoch']}), "
        f"{m['seconds_per_epoch'] * 1000:.1f} ms/epoch; train {result.trained['samples']} "
        f"+ replay {result.trained['replay_samples']}, held out {result.trained['holdout_samples']}; "
        f"backbone runs {m['feature_cache']['misses']} (cached {m['feature_cache']['hits']})",
        f"held-out accuracy {m['previous_holdout_accuracy']:.4f} -> {m['holdout_accuracy']:.4f}",
    ]
    for group, row in m["classes"].items():
        if row["after"] is not None:
            b = "-" if row["before"] is None else f"{row['before']:.4f}"
            lines.append(
                f"  {group.replace('_', ' ')}: {b} -> {row['after']:.4f} "
                f"({row['samples']} samples, {row['on']})"
            )
    if result.trained["added_classes"]:
        lines.append(f"  added classes: {', '.join(result.trained['added_classes'])}")
    if out is not None:
        lines.append(f"wrote {out} (version {result.trained['parent_version'] + 1})")
    return "\n".join(lines)


@click.command("finetune")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    required=True,
    help="Labelled images: DIR/<class>/*.png, or DIR/train/<class>/ + DIR/val/<class>/.",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="New bundle folder [NAME-vVERSION in the current folder; a temporary one with --activate].",
)
@click.option("--add-classes", is_flag=True, help="Learn classes the bundle does not know.")
@click.option("--resize", is_flag=True, help="Resize images of another size to the model's.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs [30].")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=None, help="[adam].")
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Learning rate [3e-3 Adam, 1e-2 SGD].",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[64].")
@click.option(
    "--weight-decay", type=click.FloatRange(min=0), default=None, help="L2 on weights [1e-4]."
)
@click.option(
    "--momentum",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="SGD momentum [0.9].",
)
@click.option(
    "--patience",
    type=click.IntRange(min=1),
    default=None,
    help="Early-stopping patience in epochs [5].",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Held out when DIR has no val/ [0.2].",
)
@click.option(
    "--no-balance", is_flag=True, help="Do not weight the loss by inverse class frequency."
)
@click.option("--seed", type=int, default=None, help="[0].")
@click.option(
    "--cache",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Feature cache folder (the backbone runs once per image across runs).",
)
@click.option(
    "--replay",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Replay buffer file for incremental learning (read, trained on, updated).",
)
@click.option(
    "--distill",
    type=click.FloatRange(min=0),
    default=None,
    help="Weight of distillation from the current head (keeps old classes) [2.0 when adding "
    "classes or replaying old samples, else 0].",
)
@click.option(
    "--no-memory",
    is_flag=True,
    help="Do not train on the bundle's exemplars of its build classes (they are still measured).",
)
@click.option(
    "--old-class-budget",
    type=click.FloatRange(0, 1),
    default=None,
    help="Accuracy the build classes may lose before --activate refuses the head, as a fraction "
    "[the bundle's trainable_head.memory.budget, 0.02].",
)
@click.option(
    "--replay-size",
    type=click.IntRange(min=1),
    default=2000,
    show_default=True,
    help="Replay buffer capacity (samples).",
)
@click.option(
    "--sign-key",
    type=click.Path(path_type=Path),
    envvar="EDGESMITH_DEVICE_KEY",
    default=None,
    help="The device's private key that signs the new bundle [env: EDGESMITH_DEVICE_KEY; with --activate: the agent's device_key].",
)
@click.option(
    "--activate",
    is_flag=True,
    help="Install the new bundle through the agent's A/B switch (refused if worse on the held-out split).",
)
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Agent root folder (with --activate).",
)
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="agent.yaml (with --activate).",
)
@click.option(
    "--key",
    "keys",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Trusted fleet public key (with --activate); repeatable.",
)
@click.option("--target", default=None, help="Device profile (with --activate) [detected].")
@click.option(
    "--allow-unsigned",
    is_flag=True,
    default=None,
    help="Accept unsigned bundles (development only).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def finetune_cmd(
    bundle: Path,
    data: Path,
    out: Path | None,
    add_classes: bool,
    resize: bool,
    cache: Path | None,
    replay: Path | None,
    replay_size: int,
    distill: float | None,
    no_memory: bool,
    old_class_budget: float | None,
    sign_key: Path | None,
    activate: bool,
    root: Path | None,
    config: Path | None,
    keys: tuple[Path, ...],
    target: str | None,
    allow_unsigned: bool | None,
    as_json: bool,
    no_balance: bool,
    **options: Any,
) -> None:
    """Train BUNDLE's head on labelled images in DIR and write the next bundle version.

    \b
    Examples:
      edgesmith finetune out/bundles/fmnist-head --data photos/ -o fmnist-head-v2
      edgesmith finetune /var/lib/edgesmith/current --data photos/ --activate \\
          --config /etc/edgesmith/agent.yaml
    """
    from edgesmith.runtime import load
    from edgesmith.runtime.finetune import FeatureCache, finetune_model, require_head
    from edgesmith.runtime.imagefolder import read_image_folder

    agent_cfg = None
    if activate:
        from edgesmith.devices.ota.cli import agent_config

        agent_cfg = agent_config(
            config,
            root=root,
            trusted_keys=list(keys) or None,
            target=target,
            require_signature=False if allow_unsigned else None,
            device_key=sign_key,
        )
        sign_key = sign_key or agent_cfg.device_key
    elif root or config or target:
        raise click.UsageError("--root, --config and --target go with --activate")
    model = load(bundle)
    require_head(model)  # before reading any data
    if out is not None and out.exists():
        raise BundleError(f"{out} already exists", hint="pick another -o path or remove it first")
    key_obj = None
    if sign_key is not None:
        from edgesmith.runtime.signing import load_private_key

        key_obj = load_private_key(sign_key)  # a bad key fails now, not after training
    assert model.manifest is not None
    train, held = read_image_folder(data, model.manifest.preprocess, model.inputs[0].shape, resize)
    if replay is None and agent_cfg is not None:  # the device's own classes are kept too
        replay = Path(agent_cfg.root) / "local" / "replay.npz"
        replay.parent.mkdir(parents=True, exist_ok=True)
    buf = None
    if replay is not None:
        from edgesmith.runtime.finetune.incremental import ReplayBuffer

        buf = ReplayBuffer.load(replay, capacity=replay_size)
    tmp_dir = None
    if out is None:
        if activate:
            tmp_dir = Path(
                tempfile.mkdtemp(prefix=".finetune-", dir=agent_cfg.root if agent_cfg else None)
            )
            out = tmp_dir / f"{model.name}-v{(model.version or 0) + 1}"
        else:
            out = Path(f"{model.name}-v{(model.version or 0) + 1}")
            if out.exists():
                raise BundleError(f"{out} already exists", hint="pick another path with -o")
    try:
        result = finetune_model(
            model,
            train.x,
            train.y,
            add_classes=add_classes,
            holdout=(held.x, held.y) if held is not None else None,
            out=out,
            sign_key=key_obj,
            cache=FeatureCache(cache) if cache else None,
            replay=buf,
            balance=False if no_balance else None,
            distill=distill,
            memory=False if no_memory else None,
            **options,
        )
        doc: dict[str, Any] = {
            "bundle": None if tmp_dir else str(out),
            "version": (model.version or 0) + 1,
            "metrics": result.metrics,
            "trained": result.trained,
            "history": result.history,
        }
        if not as_json:
            click.echo(_summary(result, None if tmp_dir else out))
        if not result.improved:
            click.echo(
                "warning: the new head is not better on the held-out split than the current one",
                err=True,
            )
        check = result.metrics.get("old_class_check")
        if check is not None and not _within(check, old_class_budget):
            click.echo(
                f"warning: the old classes lose {100 * check['drop']:.1f} points on the bundle's "
                f"held-out memory samples ({check['before']:.4f} -> {check['after']:.4f}); "
                "--activate and the OTA agent refuse this head",
                err=True,
            )
        if activate and agent_cfg is not None:
            doc["activation"] = _activate(agent_cfg, out, result.holdout, as_json, old_class_budget)
        # a refused activation leaves the device's local data as it was
        installed = doc.get("activation", {"status": "installed"})["status"] == "installed"
        if buf is not None and replay is not None and installed:
            buf.save(replay)
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
    act = doc.get("activation")
    if act is not None and act["status"] != "installed":
        raise CheckFailed(
            f"activation {act['status']}: {act['reason']}", hint="the installed model is unchanged"
        )


def _within(check: dict[str, Any], budget: float | None) -> bool:
    limit = check["budget"] if budget is None else budget
    return bool(check["drop"] <= limit + 1e-9)


def _activate(
    cfg: Any, bundle: Path, holdout: Any, quiet: bool, budget: float | None = None
) -> dict[str, Any]:
    from edgesmith.devices.ota.agent import Agent
    from edgesmith.devices.ota.local import activate

    agent = Agent(cfg)
    try:
        agent.start()
        act = activate(agent, bundle, holdout, budget=budget)
    except EdgesmithError:
        raise
    finally:
        agent.close()
    if not quiet:
        r = act.result
        acc = (
            f" (held-out {act.previous_accuracy:.4f} -> {act.accuracy:.4f} on {act.samples})"
            if act.accuracy is not None and act.previous_accuracy is not None
            else ""
        )
        if act.old_classes is not None:
            o = act.old_classes
            acc += f"; old classes {o['before']:.4f} -> {o['after']:.4f} on {o['samples']}"
        click.echo(f"activation: {r.status}{acc}" + (f": {r.reason}" if r.reason else ""))
    return act.to_json()
