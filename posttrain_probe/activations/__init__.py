"""Residual-stream activations: capture (truncated, paired forwards), the on-disk store, sources.

Public API: :class:`ActivationStoreWriter`, :class:`ActivationStore`, :class:`PairedActivations`,
:class:`LiveActivations` (settings :class:`LiveConfig`), :class:`CollectConfig` and :class:`CollectResult` (the step itself is
:func:`posttrain_probe.activations.collect.collect`: the submodule holds the name) and
:func:`capture_batch`. Imported on first use (the configs eagerly: they are torch-free), so the command
line starts without importing torch.
"""

from posttrain_probe.activations.config import CollectConfig
from posttrain_probe.activations.live_config import LiveConfig
from posttrain_probe.lazy import lazy_attributes

__all__ = [
    "ActivationStore",
    "ActivationStoreWriter",
    "CapturedTokens",
    "CollectConfig",
    "CollectResult",
    "LiveActivations",
    "LiveConfig",
    "PairedActivations",
    "capture_batch",
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
    "CollectResult": "collect",
    "LiveActivations": "live",
    "PairedActivations": "paired",
}

__getattr__ = lazy_attributes(__name__, _LAZY)
