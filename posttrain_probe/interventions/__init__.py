"""Interventions on crosscoder features: gradient blocking during training (docs/methods.md sec. 9) and
feature edits in the forward pass (docs/methods.md sec. 7). Feature sets live in
:mod:`posttrain_probe.analysis.feature_sets`."""

from posttrain_probe.interventions.activation_stats import ReferenceReading, max_activations, source_activation_stats
from posttrain_probe.interventions.blocking import MODES, GradientBlocker
from posttrain_probe.interventions.features import INTERVENTION_MODES, POSITIONS, FeatureEdit, FeatureIntervention

__all__ = [
    "INTERVENTION_MODES",
    "MODES",
    "POSITIONS",
    "ReferenceReading",
    "FeatureEdit",
    "FeatureIntervention",
    "GradientBlocker",
    "max_activations",
    "source_activation_stats",
]
