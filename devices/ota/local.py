"""Heads fine-tuned on the device, through the OTA agent's A/B switch (docs/finetune.md).

* :func:`activate` installs a fine-tuned bundle with :meth:`Agent.install_local`: the same
  verify → copy into the inactive slot → health check → switch → commit as an OTA update, plus a
  gate before the switch that refuses the new head if it is less accurate than the installed one
  on the held-out split (the new samples plus those kept from earlier activations,
  :mod:`~edgesmith.devices.ota.holdout`). A refusal or any failure leaves the installed model in
  use (``rolled-back``).
* :func:`revert` goes back from a fine-tuned head to the model in the other slot
  (:meth:`Agent.revert`, the same transaction and hooks as an install).
* The OTA policy ``keep`` is in :mod:`~edgesmith.devices.ota.keep`; whom the agent trusts for
  device-made bundles in :mod:`~edgesmith.devices.ota.trust`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import UpdateError
from edgesmith.runtime import load
from edgesmith.runtime.bundle import Manifest, read_bundle
from edgesmith.runtime.finetune.head import backbone_fingerprint, load_head
from edgesmith.runtime.finetune.memory import check_old_classes, label_accuracy, load_memory

from .agent import Agent
from .config import UpdateResult
from .holdout import PER_CLASS, holdout_features, holdout_names, load_holdout, save_holdout
from .keep import keep_local_head
from .trust import check_local_bundle, load_device_key

__all__ = [
    "Activation",
    "activate",
    "check_local_bundle",
    "keep_local_head",
    "load_device_key",
    "load_holdout",
    "revert",
]


@dataclass
class Activation:
    """The outcome of :func:`activate`: the agent's result and the held-out comparison."""

    result: UpdateResult
    accuracy: float | None = None  # the new head on the held-out split
    previous_accuracy: float | None = None  # the installed head on the same samples
    samples: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    # the build classes on the bundle's held-out memory samples: installed head vs new head
    old_classes: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **self.result.to_json(),
            "holdout_accuracy": self.accuracy,
            "previous_holdout_accuracy": self.previous_accuracy,
            "holdout_samples": self.samples,
            "old_classes": self.old_classes,
        }


def activate(
    agent: Agent,
    bundle: str | Path,
    holdout: tuple[np.ndarray, Sequence[Any] | np.ndarray] | None,
    per_class: int = PER_CLASS,
    budget: float | None = None,
) -> Activation:
    """Install a fine-tuned bundle through the agent's A/B switch, refusing a worse head.

    Two gates run after the health check, before the switch: the old classes (the bundle's
    held-out memory samples of its build classes) may lose at most ``budget`` accuracy against
    the installed head, and the new head must be at least as accurate as the installed one on
    the held-out split (this run's samples plus those kept from earlier activations).

    Args:
        agent: the device's agent (started here if needed).
        bundle: the new bundle version written by ``finetune`` (signed with the device key when
            the agent requires signatures).
        holdout: held-out samples and labels (names or indices into the bundle's labels); they
            are compared together with the samples kept from earlier activations.
        per_class: held-out samples kept per class for later comparisons.
        budget: accuracy the old classes may lose (None: the bundle's
            ``trainable_head.memory.budget``, 0.02 by default).

    Returns:
        An :class:`Activation`; ``result.status`` is ``installed`` or ``rolled-back``/``failed``
        (the installed model untouched).

    Example:
        >>> act = activate(agent, "fmnist-v2", (x_val, y_val))    # doctest: +SKIP
        >>> act.result.status, act.accuracy, act.previous_accuracy  # doctest: +SKIP
    """
    agent.start()
    new_m = read_bundle(bundle, verify=False)
    labels = list(new_m.labels or [])
    xs, ys = [], []
    stored = load_holdout(agent.slots.root)
    if holdout is not None and len(holdout[0]):
        x_new = np.asarray(holdout[0])
        xs.append(x_new)
        ys.append(holdout_names(holdout[1], labels))
        if (
            stored is not None
            and stored[0].shape[1:] == x_new.shape[1:]
            and stored[0].dtype == x_new.dtype
        ):
            xs.insert(0, stored[0])
            ys.insert(0, stored[1])
    elif stored is not None:
        xs, ys = [stored[0]], [stored[1]]
    act = Activation(UpdateResult("failed"))
    if not xs:
        m = agent.installed()
        act.result = UpdateResult(
            "failed",
            m.version if m else None,
            new_m.version,
            name=new_m.name,
            reason="no held-out samples to compare the new head with the installed one",
        )
        return act
    x, y = np.concatenate(xs), np.concatenate(ys)
    act.samples = len(y)

    def gate(dest: Path, m: Manifest) -> None:
        installed = agent.installed()
        if installed is None or installed.trainable_head is None:
            raise UpdateError("the installed model has no trainable head", hint="install one first")
        if backbone_fingerprint(m) != backbone_fingerprint(installed):
            raise UpdateError(
                "the fine-tuned bundle's backbone differs from the installed one",
                hint="fine-tune the installed bundle (ROOT/current)",
            )
        model = load(dest)
        current = load_head(agent.current_path, installed.trainable_head)
        memory = load_memory(dest, m.trainable_head, m)
        if memory is not None and len(memory.holdout):  # the old task first
            mf = memory.features(model, "holdout")
            names = memory.names("holdout")
            before = label_accuracy(current, list(installed.labels or []), mf, names)
            check = check_old_classes(
                memory, mf, model.head, list(m.labels or []), before, "installed head", budget
            )
            act.old_classes = check.to_json()
            if not check.passed:
                raise UpdateError(
                    check.message(),
                    hint="the installed model stays; fine-tune with the bundle's memory "
                    "(the default) or with fewer epochs / a lower learning rate",
                )
        feats = holdout_features(model, x)
        act.accuracy = label_accuracy(model.head, list(m.labels or []), feats, y)
        act.previous_accuracy = label_accuracy(current, list(installed.labels or []), feats, y)
        if act.accuracy < act.previous_accuracy:
            raise UpdateError(
                f"the fine-tuned head is worse on the held-out split: {act.accuracy:.4f} < "
                f"{act.previous_accuracy:.4f} (installed, {len(y)} samples)",
                hint="train on more or cleaner data; the installed model stays",
            )

    act.result = agent.install_local(bundle, gate=gate)
    if act.result.status == "installed":
        save_holdout(agent.slots.root, x, y, per_class)
    return act


def revert(agent: Agent) -> UpdateResult:
    """Go back from a head fine-tuned here to the model in the other slot: :meth:`Agent.revert`.

    Raises:
        UpdateError: the model in use is not a local fine-tune, or there is nothing to go back to.
    """
    return agent.revert()
