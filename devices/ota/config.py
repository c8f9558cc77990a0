"""Agent settings (``agent.yaml``) and the result of one update check."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgesmith.errors import EdgesmithError
from edgesmith.text import printable

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
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise EdgesmithError(
                f"cannot read agent config {p}: {exc.strerror}", hint="check the path"
            ) from None
        except yaml.YAMLError as exc:
            raise EdgesmithError(
                f"agent config {p} is not valid YAML: {str(exc).splitlines()[0]}"
            ) from None
        if not isinstance(data, dict):
            raise EdgesmithError(
                f"agent config {p} must be a mapping of keys", hint="see docs/ota.md"
            )
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.validated(data, str(p))

    @classmethod
    def validated(cls, data: dict[str, Any], where: str = "agent config") -> AgentConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise EdgesmithError(
                f"{where}: '{loc}': {err['msg']}", hint=f"keys: {', '.join(cls.model_fields)}"
            ) from None


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
