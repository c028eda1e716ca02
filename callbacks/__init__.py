"""Training-loop integrations, shipped as ``posttrain_probe.callbacks``.

Thin adapters over :mod:`posttrain_probe`: TRL/transformers ``TrainerCallback``s (probe snapshots and activations,
gradient blocking; later the verl trainer/worker hooks). Nothing in :mod:`posttrain_probe` imports this package.
"""

from posttrain_probe.callbacks.arguments import ProbeArguments, snapshot_schedule
from posttrain_probe.callbacks.blocking import BlockingArguments, GradientBlockingCallback, blocking_callback, build_blocker
from posttrain_probe.callbacks.trainer_callbacks import ActivationStreamCallback, SnapshotCallback, add_probe_callbacks

__all__ = [
    "ActivationStreamCallback",
    "BlockingArguments",
    "GradientBlockingCallback",
    "ProbeArguments",
    "SnapshotCallback",
    "add_probe_callbacks",
    "blocking_callback",
    "build_blocker",
    "snapshot_schedule",
]
