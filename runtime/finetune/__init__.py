"""On-device fine-tuning of a bundle's trainable head, in numpy only (docs/finetune.md).

``head`` (the numpy head and the session that runs it after the backbone), ``training`` (the
loss, optimizers and loop), ``memory`` (what a bundle keeps of its build classes), ``features`` (backbone features
and labels), ``workflow``
(``finetune_model``: features, labels, the fit, the new bundle version) and ``incremental``
(replay across runs). The names below are the public API:
``from edgesmith.runtime.finetune import finetune_model``.
"""

from edgesmith.runtime.finetune.features import FeatureCache, encode_labels, label_key, require_head
from edgesmith.runtime.finetune.head import Head, HeadSession, load_head
from edgesmith.runtime.finetune.incremental import IncrementalLearner, ReplayBuffer
from edgesmith.runtime.finetune.memory import Memory, load_memory
from edgesmith.runtime.finetune.training import FinetuneConfig, TrainResult, train_head
from edgesmith.runtime.finetune.workflow import (
    FinetuneResult,
    Fit,
    finetune_model,
    fit_head,
    write_finetuned,
)

__all__ = [
    "FeatureCache",
    "FinetuneConfig",
    "FinetuneResult",
    "Fit",
    "Head",
    "HeadSession",
    "IncrementalLearner",
    "Memory",
    "ReplayBuffer",
    "TrainResult",
    "encode_labels",
    "finetune_model",
    "fit_head",
    "label_key",
    "load_head",
    "load_memory",
    "require_head",
    "train_head",
    "write_finetuned",
]
