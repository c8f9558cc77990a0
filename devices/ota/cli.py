"""``edgesmith ota``: publish updates to a store, and run the device update agent (no torch)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from edgesmith.devices.cliutil import echo_json, key_option
from edgesmith.devices.ota.config import AgentConfig
from edgesmith.errors import BundleError, CheckFailed, EdgesmithError
from edgesmith.options import field_option

__all__ = ["agent_config", "agent_options", "ota_group"]


@click.group("ota")
def ota_group() -> None:
    """Publish updates to a store and run the device update agent."""


def _announce(mqtt: str | None, channel: Any) -> None:
    if mqtt:
        from edgesmith.devices.ota.mqtt import announce

        announce(mqtt, channel.channel, {"channel": channel.channel, "seq": channel.seq})
        click.echo(f"announced seq {channel.seq} on mqtt://{mqtt}")


@ota_group.command("publish")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True))
@click.option(
    "--store",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The store folder (served by any static HTTP server).",
)
@click.option("--channel", default="stable", show_default=True, help="Channel name.")
@click.option(
    "--key",
    type=click.Path(path_type=Path),
    required=True,
    envvar="EDGESMITH_SIGN_KEY",
    help="Private key (NAME.key) that signs the channel [env EDGESMITH_SIGN_KEY].",
)
@click.option(
    "--rollout", default="100%", show_default=True, help="Share of devices that take it, e.g. 20%."
)
@click.option(
    "--expires",
    default="30d",
    show_default=True,
    help="Channel lifetime; re-sign with `ota refresh` before.",
)
@click.option(
    "--mqtt", default=None, metavar="HOST:PORT", help="Also announce on this MQTT broker."
)
@click.option("--force-channel", is_flag=True, help="Replace an unreadable channel file.")
def ota_publish(
    bundle: Path,
    store: Path,
    channel: str,
    key: Path,
    rollout: str,
    expires: str,
    mqtt: str | None,
    force_channel: bool,
) -> None:
    """Put BUNDLE into the store and point CHANNEL's signed channel.json at it."""
    from edgesmith.devices.ota.channel import parse_percent
    from edgesmith.devices.ota.publisher import channel_path, publish

    release, ch = publish(
        bundle, store, channel, key, parse_percent(rollout), expires, force_channel
    )
    click.echo(
        f"published {release.name} version {release.version} for {release.target} on '{channel}' "
        f"at {release.rollout:g}% (seq {ch.seq}, expires {ch.expires}): {channel_path(store, channel)}"
    )
    _announce(mqtt, ch)


@ota_group.command("refresh")
@click.option(
    "--store",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The store folder.",
)
@click.option("--channel", default="stable", show_default=True, help="Channel name.")
@click.option(
    "--key",
    type=click.Path(path_type=Path),
    required=True,
    envvar="EDGESMITH_SIGN_KEY",
    help="Private key (NAME.key) [env EDGESMITH_SIGN_KEY].",
)
@click.option("--expires", default="30d", show_default=True, help="New lifetime from now.")
@click.option(
    "--mqtt", default=None, metavar="HOST:PORT", help="Also announce on this MQTT broker."
)
def ota_refresh(store: Path, channel: str, key: Path, expires: str, mqtt: str | None) -> None:
    """Re-sign CHANNEL with a new expiry (run from cron well before it expires)."""
    from edgesmith.devices.ota.publisher import refresh_channel

    ch = refresh_channel(store, channel, key, expires)
    click.echo(f"re-signed '{channel}': seq {ch.seq}, expires {ch.expires}")
    _announce(mqtt, ch)


@ota_group.command("channel")
@click.option(
    "--store",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The store folder.",
)
@click.option("--channel", default="stable", show_default=True, help="Channel name.")
@key_option
def ota_channel(store: Path, channel: str, keys: tuple[Path, ...]) -> None:
    """Verify and print a store's channel file."""
    from edgesmith.devices.ota.publisher import check_channel_name, read_channel
    from edgesmith.runtime.signing import load_trusted_keys

    check_channel_name(channel)
    if not keys:
        raise EdgesmithError(
            "give the publisher's public key to check the channel", hint="--key NAME.pub"
        )
    ch = read_channel(store, channel, load_trusted_keys(keys))
    if ch is None:
        raise EdgesmithError(f"no channel '{channel}' in {store}", hint="publish a bundle first")
    echo_json(ch.to_json())
    if ch.expired():
        raise CheckFailed(
            f"channel '{channel}' expired at {ch.expires}", hint="run `edgesmith ota refresh`"
        )


def _test_step_hook() -> Any:
    """Fault injection for the OTA tests, from environment variables (never set in production).

    ``EDGESMITH_OTA_TEST_PAUSE_AT=STEP`` prints ``edgesmith-ota: paused at STEP`` and waits for a
    line on stdin (the test kills the process there); ``EDGESMITH_OTA_TEST_FAIL_AT=STEP:ENOSPC``
    raises that OS error at STEP.
    """
    import errno

    pause = set(filter(None, os.environ.get("EDGESMITH_OTA_TEST_PAUSE_AT", "").split(",")))
    fail = dict(
        x.split(":", 1)
        for x in os.environ.get("EDGESMITH_OTA_TEST_FAIL_AT", "").split(",")
        if ":" in x
    )
    if not pause and not fail:
        return None

    def hook(step: str) -> None:
        if step in pause:
            pause.discard(step)
            print(f"edgesmith-ota: paused at {step}", file=sys.stderr, flush=True)
            sys.stdin.readline()
        if step in fail:
            code = getattr(errno, fail.pop(step))
            raise OSError(code, os.strerror(code))

    return hook


def agent_config(config: Path | None, **options: Any) -> AgentConfig:
    """The agent's settings: ``config`` (agent.yaml) with the options given on the command line.

    Raises:
        EdgesmithError: no root folder, or a bad file or value (every problem listed).
    """
    options = {k: v for k, v in options.items() if v not in (None, ())}
    if config is not None:
        return AgentConfig.from_yaml(config, **options)
    if "root" not in options:
        raise EdgesmithError(
            "no agent root folder", hint="pass --root DIR (or --config agent.yaml)"
        )
    return AgentConfig.validated(options)


def _field(name: str, *decls: str, help: str, **attrs: Any) -> Any:
    """An agent option made from the ``AgentConfig`` field ``name`` (None unless given, so that
    agent.yaml's value applies)."""
    return field_option(AgentConfig, name, *decls, help=help, **attrs)


_agent_options = [
    click.option(
        "--config",
        type=click.Path(path_type=Path, dir_okay=False),
        help="agent.yaml with the settings below.",
    ),
    click.option(
        "--root",
        type=click.Path(path_type=Path, file_okay=False),
        help="Device folder for slots and state (e.g. /var/lib/edgesmith).",
    ),
    key_option,
    _field("target", help="Device profile (default: detected)."),
    _field("name", help="Model name to follow (default: the one offered)."),
    click.option(
        "--allow-unsigned",
        is_flag=True,
        default=None,
        help="Accept unsigned bundles (development only).",
    ),
]


def agent_options(f: Any) -> Any:
    """The options every agent command takes: --config, --root, --key, --target, --name,
    --allow-unsigned."""
    for opt in reversed(_agent_options):
        f = opt(f)
    return f


@ota_group.command("agent")
@agent_options
@_field("server", help="Base URL of the store (http://host/store).")
@_field("channel", help="Channel to follow [stable].")
@_field("mqtt", metavar="HOST:PORT", help="Broker for announcements and status.")
@_field("report_url", "--report", help="POST status JSON to this URL.")
@_field("poll_interval_s", "--interval", help="Seconds between polls [300].")
@_field("device_id", help="Device id (default: from /etc/machine-id).")
@_field("latency_budget_ms", help="Health check latency budget.")
@_field("before_install", help="Shell command run before the switch.")
@_field("after_install", help="Shell command run after the switch.")
@_field("on_rollback", help="Shell command run when an update is rolled back.")
@click.option("--once", is_flag=True, help="Check once and exit (0 ok, 1 failed or rolled back).")
def ota_agent(
    config: Path | None,
    root: Path | None,
    keys: tuple[Path, ...],
    target: str | None,
    name: str | None,
    allow_unsigned: bool | None,
    once: bool,
    **options: Any,
) -> None:
    """Run the update agent: poll the store (and listen on MQTT), install, report.

    \b
    Example (systemd runs this, see docs/devices.md):
      edgesmith ota agent --root /var/lib/edgesmith --server https://updates.example.com/store \\
          --key /etc/edgesmith/release.pub --mqtt broker.example.com:1883
    """
    from edgesmith.devices.ota.agent import Agent
    from edgesmith.devices.ota.config import printable

    cfg = agent_config(
        config,
        root=root,
        trusted_keys=list(keys) or None,
        target=target,
        name=name,
        require_signature=False if allow_unsigned else None,
        **options,
    )
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger("edgesmith").setLevel(logging.INFO)
    agent = Agent(cfg, step_hook=_test_step_hook())
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    result = agent.run(once=once)
    if once and result is not None:
        echo_json(result.to_json())
        if not result.ok:
            raise CheckFailed(
                f"update {result.status}: {printable(result.reason)}",
                hint="the model in use is the version above",
            )


@ota_group.command("install")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True))
@agent_options
def ota_install(
    bundle: Path,
    config: Path | None,
    root: Path | None,
    keys: tuple[Path, ...],
    target: str | None,
    name: str | None,
    allow_unsigned: bool | None,
) -> None:
    """Install a local BUNDLE through the agent's checks (provisioning a new device)."""
    from edgesmith.devices.ota.agent import Agent
    from edgesmith.devices.ota.config import printable

    cfg = agent_config(
        config,
        root=root,
        trusted_keys=list(keys) or None,
        target=target,
        name=name,
        require_signature=False if allow_unsigned else None,
    )
    agent = Agent(cfg, step_hook=_test_step_hook())
    agent.start()
    try:
        result = agent.install(bundle)
    finally:
        agent.close()
    echo_json(result.to_json())
    if not result.ok:
        raise CheckFailed(
            f"install {result.status}: {printable(result.reason)}",
            hint="the model in use is the version above",
        )


@ota_group.command("status")
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The agent's root folder.",
)
def ota_status(root: Path) -> None:
    """Print the device's installed model, slots and last update result."""
    from edgesmith.devices.ota.slots import Slots
    from edgesmith.runtime.bundle import verify_bundle

    slots = Slots(root)
    active = slots.active()
    out: dict[str, Any] = {"root": str(root), "active_slot": active, "slots": {}}
    for s in ("a", "b"):
        try:
            m = verify_bundle(slots.path(s), check_files=False).manifest
            out["slots"][s] = {"name": m.name, "version": m.version, "target": m.target}
        except BundleError:
            out["slots"][s] = None
    if slots.status_file.is_file():
        try:
            last = json.loads(slots.status_file.read_bytes())
        except (OSError, ValueError, RecursionError) as exc:
            # only a report of the last check: say so and go on (the next check rewrites it)
            click.echo(
                f"warning: {slots.status_file} is unreadable ({type(exc).__name__}); "
                "the next update check rewrites it",
                err=True,
            )
            last = None
        out["last"] = last if isinstance(last, dict) else None
    echo_json(out)
    if active is None:
        raise CheckFailed(
            f"no model installed under {root}", hint="provision one with `edgesmith ota install`"
        )
