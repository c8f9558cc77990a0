"""Over-the-air model updates: a static store with signed channel files, and a device agent with
A/B slots, health checks and rollback (DESIGN.md section 6). Imports no torch."""

from edgesmith.devices.ota.agent import STEPS, Agent, AgentConfig, UpdateResult
from edgesmith.devices.ota.channel import Channel, Release, in_rollout, rollout_bucket
from edgesmith.devices.ota.health import HealthReport, check_health
from edgesmith.devices.ota.hooks import HookContext, Hooks
from edgesmith.devices.ota.publisher import publish, read_channel, refresh_channel
from edgesmith.devices.ota.slots import Slots

__all__ = [
    "STEPS",
    "Agent",
    "AgentConfig",
    "Channel",
    "HealthReport",
    "HookContext",
    "Hooks",
    "Release",
    "Slots",
    "UpdateResult",
    "check_health",
    "in_rollout",
    "publish",
    "read_channel",
    "refresh_channel",
    "rollout_bucket",
]
