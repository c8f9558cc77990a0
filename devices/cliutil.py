"""What the device commands share: the trusted-key option and JSON output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

__all__ = ["echo_json", "key_option"]

key_option = click.option(
    "--key",
    "keys",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Trusted public key file (NAME.pub) or folder of *.pub; repeatable.",
)


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON with sorted keys."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
