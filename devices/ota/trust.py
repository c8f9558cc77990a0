"""Whom the agent believes: the fleet's release keys vouch for any bundle; the device's own key
(``device_key``, a private key that never leaves the device) signs what the device makes — a
fine-tuned head, or an update with the local head kept — and is trusted only for bundles whose
files other than the head and golden data are exactly those of a bundle the fleet signed (their
fingerprints are kept in ``state.json``). A stolen device key therefore cannot install a new
backbone, on this device or any other (other devices do not trust it at all).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgesmith.errors import BundleError, EdgesmithError
from edgesmith.runtime.bundle import BundleCheck, Manifest, verify_bundle
from edgesmith.runtime.bundle.headspec import backbone_fingerprint

from .config import AgentConfig
from .state import AgentState

__all__ = ["FLEET_MODELS_KEPT", "Trust", "check_local_bundle", "is_local_head", "load_device_key"]

FLEET_MODELS_KEPT = 8  # fingerprints of fleet models remembered (the slots hold two)


def load_device_key(path: str | Path) -> tuple[Any, dict[str, bytes]]:
    """The device's private key and ``{key id: raw public key}`` for it."""
    from cryptography.hazmat.primitives import serialization

    from edgesmith.runtime.signing import key_id, load_private_key

    key = load_private_key(path)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key, {key_id(raw): raw}


def is_local_head(m: Manifest | None) -> bool:
    """Whether ``m`` is a head fine-tuned on this device."""
    return bool(m and (m.trainable_head or {}).get("trained", {}).get("by") == "device")


def check_local_bundle(m: Manifest, fleet_models: dict[str, str]) -> None:
    """Refuse a device-made bundle unless it only changes the head of a fleet-published model.

    Raises:
        BundleError: no trainable head made here, or model files the fleet did not publish.
    """
    if not is_local_head(m):
        raise BundleError(
            f"{m.name} version {m.version} is signed by this device's key but is not a head "
            "fine-tuned here",
            hint="fleet bundles must be signed with a release key",
        )
    if backbone_fingerprint(m) not in fleet_models:
        raise BundleError(
            f"{m.name} version {m.version} changes more than the head: its model files are not "
            "those of a bundle the fleet published",
            hint="on-device fine-tuning may change only head.npz; rebuild it from the installed bundle",
        )


class Trust:
    """The keys of one agent: the fleet's (``trusted_keys``) and the device's own (``device_key``).

    Raises (on construction):
        EdgesmithError: no fleet key where signatures are required or a server is used; an
            unreadable key file.
    """

    def __init__(self, config: AgentConfig) -> None:
        self.require_signature = config.require_signature
        self.fleet: dict[str, bytes] | None = None
        if config.trusted_keys:
            from edgesmith.runtime.signing import load_trusted_keys

            self.fleet = dict(load_trusted_keys(config.trusted_keys))
        elif config.require_signature or config.server:
            raise EdgesmithError(
                "no trusted public key configured",
                hint="give the publisher's NAME.pub with --key (or trusted_keys in agent.yaml)",
            )
        self.device_key: Any = None  # signs heads fine-tuned here
        self.device: dict[str, bytes] = {}  # its public key: trusted for head-only bundles
        if config.device_key:
            self.device_key, self.device = load_device_key(config.device_key)

    def bundle_keys(self) -> dict[str, bytes] | None:
        """Every key a bundle's signature may verify against (None: none configured)."""
        if self.fleet is None and not self.device:
            return None
        return {**(self.fleet or {}), **self.device}

    def verify(self, path: Path, state: AgentState, local: bool = False) -> BundleCheck:
        """Verify a bundle's signature and files. A fleet key vouches for anything; the device's
        own key only for a head fine-tuned here on a model the fleet published (and a ``local``
        install must be such a bundle whoever signed it). A fleet bundle's backbone is
        remembered in ``state.fleet_models``."""
        check = verify_bundle(
            path, trusted_keys=self.bundle_keys(), require_signature=self.require_signature
        )
        signer = check.signed_by
        by_device = (
            signer is not None and signer in self.device and signer not in (self.fleet or {})
        )
        if by_device or local:
            check_local_bundle(check.manifest, state.fleet_models)
        else:  # the fleet (or, without signatures, the operator) vouches for this model
            known = state.fleet_models
            fp = backbone_fingerprint(check.manifest)
            if fp not in known:
                known[fp] = f"{check.manifest.name}:{check.manifest.version}"
                for old in list(known)[:-FLEET_MODELS_KEPT]:
                    del known[old]
        return check
