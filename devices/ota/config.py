"""Agent settings (``agent.yaml``) and the result of one update check."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgesmith.errors import EdgesmithError, RecipeError
from edgesmith.text import printable
from edgesmith.validation import validate
from edgesmith.yamlutil import Loc, parse_yaml_with_lines

__all__ = ["AgentConfig", "UpdateResult", "printable"]


class AgentConfig(BaseModel):
    """Agent settings (``agent.yaml`` holds the same keys)."""

    model_config = ConfigDict(extra="forbid")

    root: Path
    server: str | None = (
        None  # the store's base URL; the channel file is <server>/<channel>/channel.json
    )
    channel: str = Field(default="stable", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    target: str | None = None  # device profile; None: `edgesmith devices detect`
    name: str | None = None  # the model to follow; None: the one release for this target
    device_id: str | None = None  # None: derived from /etc/machine-id, else random (kept in state)
    trusted_keys: list[Path] = Field(
        default_factory=list
    )  # publisher public keys (*.pub or folders)
    require_signature: bool = True
    # this device's own private key (NAME.key, mode 0600): signs heads fine-tuned here; its public
    # key is trusted only for bundles that change nothing but the head (docs/finetune.md)
    device_key: Path | None = None
    mqtt: str | None = None  # HOST:PORT of the broker for announcements and status
    report_url: str | None = None  # status is POSTed here as JSON
    poll_interval_s: float = Field(default=300.0, gt=0)
    latency_budget_ms: float | None = Field(default=None, gt=0)
    require_golden: bool = False
    before_install: str | None = None  # shell commands; Python callables go to Agent(hooks=...)
    after_install: str | None = None
    on_rollback: str | None = None
    hook_timeout_s: float = Field(default=300.0, gt=0)
    download_retries: int = Field(default=5, ge=0)
    retry_backoff_s: float = Field(default=1.0, ge=0)
    timeout_s: float = Field(default=30.0, gt=0)  # one network operation; all of a small request
    check_deadline_s: float = Field(default=3600.0, gt=0)  # the network waits of one check
    download_deadline_s: float = Field(default=3600.0, gt=0)  # one bundle, retries included
    min_download_rate: float = Field(default=4096.0, ge=0)  # bytes/s over timeout_s; 0: none
    announce_min_interval_s: float = Field(default=10.0, ge=0)  # between announced checks
    max_bundle_bytes: int = Field(default=4 << 30, ge=1)
    switch_grace_s: float = Field(default=2.0, ge=0)  # lets a watching server see each switch
    max_attempts: int = Field(default=3, ge=1)  # interrupted installs before a version is given up

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> AgentConfig:
        """Read ``agent.yaml``; ``overrides`` (not None) replace its keys.

        Raises:
            EdgesmithError: a missing, malformed or invalid file.
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise EdgesmithError(
                f"cannot read agent config {p}: {getattr(exc, 'strerror', None) or exc}",
                hint="check the path",
            ) from None
        try:  # the recipe's safe, bounded loader, which also keeps every key's line
            data, lines = parse_yaml_with_lines(text, str(p))
        except RecipeError as exc:
            raise EdgesmithError(f"agent config {exc.message}", hint=exc.hint) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise EdgesmithError(
                f"agent config {p} must be a mapping of keys", hint="see docs/ota.md"
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        data.update(given)  # a value from the command line has no line in the file
        lines = {loc: n for loc, n in lines.items() if loc and loc[0] not in given}
        return cls.validated(data, str(p), lines)

    @classmethod
    def validated(
        cls, data: dict[str, Any], where: str = "agent config", lines: dict[Loc, int] | None = None
    ) -> AgentConfig:
        """``data`` as settings; every problem is listed (``agent.yaml:LINE key: problem``).

        Raises:
            EdgesmithError: naming each bad or unknown key, with the nearest known key.
        """
        return validate(
            cls, data, source=where, lines=lines, hint=f"keys: {', '.join(cls.model_fields)}"
        )


@dataclass
class UpdateResult:
    """The outcome of one check or install.

    ``status`` is one of: ``installed``, ``up-to-date``, ``not-in-rollout``, ``skipped`` (this
    version failed here before), ``failed`` (refused before anything changed) or ``rolled-back``
    (it failed after install began; the old model is in use).
    """

    status: str
    version: int | None = None  # the version in use afterwards
    offered: int | None = None
    previous: int | None = None
    name: str | None = None
    reason: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("installed", "up-to-date", "not-in-rollout", "skipped")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
