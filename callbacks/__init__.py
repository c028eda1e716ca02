"""Training-loop integrations, shipped as ``posttrain_probe.callbacks``.

Thin adapters over :mod:`posttrain_probe`: TRL/transformers ``TrainerCallback``s (and, later, the
verl trainer/worker hooks). Nothing in :mod:`posttrain_probe` imports this package.
"""

from posttrain_probe.callbacks.arguments import ProbeArguments, snapshot_schedule
from posttrain_probe.callbacks.trainer_callbacks import ActivationStreamCallback, SnapshotCallback, add_probe_callbacks

__all__ = ["ActivationStreamCallback", "ProbeArguments", "SnapshotCallback", "add_probe_callbacks", "snapshot_schedule"]
