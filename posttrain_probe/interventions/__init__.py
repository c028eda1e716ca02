"""Interventions on crosscoder features: gradient blocking (docs/methods.md sec. 9) and the feature-preservation
loss (sec. 12) during training, and feature edits in the forward pass (docs/methods.md sec. 7). Feature sets live in
:mod:`posttrain_probe.analysis.feature_sets`."""

from posttrain_probe.interventions.activation_stats import ReferenceReading, max_activations, source_activation_stats
from posttrain_probe.interventions.blocking import MODES, GradientBlocker
from posttrain_probe.interventions.features import INTERVENTION_MODES, POSITIONS, FeatureEdit, FeatureIntervention
from posttrain_probe.interventions.preserve import FeaturePreserver, preservation_loss

__all__ = [
    "INTERVENTION_MODES",
    "MODES",
    "POSITIONS",
    "ReferenceReading",
    "FeatureEdit",
    "FeatureIntervention",
    "FeaturePreserver",
    "GradientBlocker",
    "max_activations",
    "preservation_loss",
    "source_activation_stats",
]
