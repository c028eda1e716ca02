"""Interventions on crosscoder features: gradient blocking during training (docs/methods.md sec. 9) and
feature edits in the forward pass (docs/methods.md sec. 7)."""

from posttrain_probe.interventions.blocking import MODES, GradientBlocker
from posttrain_probe.analysis.feature_sets import (
    CATEGORY_NAMES,
    FeatureSet,
    crosscoder_fingerprint,
    load_feature_set,
    read_feature_set,
    resolve_features,
    write_feature_set,
)
from posttrain_probe.interventions.features import (
    INTERVENTION_MODES,
    POSITIONS,
    FeatureIntervention,
    max_activations,
    source_activation_stats,
)

__all__ = [
    "CATEGORY_NAMES",
    "INTERVENTION_MODES",
    "MODES",
    "POSITIONS",
    "FeatureIntervention",
    "FeatureSet",
    "GradientBlocker",
    "crosscoder_fingerprint",
    "load_feature_set",
    "max_activations",
    "read_feature_set",
    "resolve_features",
    "source_activation_stats",
    "write_feature_set",
]
