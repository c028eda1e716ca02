"""Residual-stream activations: capture (truncated, paired forwards), the on-disk store, sources.

Public API: :class:`ActivationStoreWriter`, :class:`ActivationStore`, :class:`PairedActivations`,
:class:`LiveActivations`, :func:`collect_activations` (+ :class:`CollectConfig`) and
:func:`capture_batch`.
"""

from posttrain_probe.activations.capture import CapturedTokens, capture_batch, select_tokens
from posttrain_probe.activations.collect import CollectConfig, collect_activations
from posttrain_probe.activations.live import LiveActivations
from posttrain_probe.activations.paired import PairedActivations
from posttrain_probe.activations.store import ActivationStore, ActivationStoreWriter, merge_rank_manifests

__all__ = [
    "ActivationStore",
    "ActivationStoreWriter",
    "CapturedTokens",
    "CollectConfig",
    "LiveActivations",
    "PairedActivations",
    "capture_batch",
    "collect_activations",
    "merge_rank_manifests",
    "select_tokens",
]
