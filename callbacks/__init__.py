"""Training-loop integrations, shipped as ``posttrain_probe.callbacks``.

Thin adapters over :mod:`posttrain_probe`: TRL/transformers ``TrainerCallback``s and the verl
trainer/worker hooks. Nothing in :mod:`posttrain_probe` imports this package.
"""

__all__: list[str] = []
