"""Residual-stream activations: capture (truncated, paired forwards), the on-disk store, sources.

Public API: :class:`ActivationStoreWriter`, :class:`ActivationStore`, :class:`PairedActivations`,
:class:`LiveActivations`, :func:`collect_activations` (+ :class:`CollectConfig`) and
:func:`capture_batch`. Imported on first use (the config eagerly: it is torch-free), so the command
line starts without importing torch.
"""

from posttrain_probe.activations.config import CollectConfig
from posttrain_probe.lazy import lazy_attributes

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

_LAZY = {
    "ActivationStore": "store",
    "ActivationStoreWriter": "store",
    "merge_rank_manifests": "store",
    "CapturedTokens": "capture",
    "capture_batch": "capture",
    "select_tokens": "capture",
    "collect_activations": "collect",
    "LiveActivations": "live",
    "PairedActivations": "paired",
}

__getattr__ = lazy_attributes(__name__, _LAZY)
