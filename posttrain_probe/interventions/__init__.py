"""Interventions on crosscoder features: gradient blocking during training (SPEC sec. 9)."""

from posttrain_probe.interventions.blocking import MODES, GradientBlocker
from posttrain_probe.interventions.feature_sets import CATEGORY_NAMES, read_feature_set, resolve_features, write_feature_set

__all__ = ["CATEGORY_NAMES", "MODES", "GradientBlocker", "read_feature_set", "resolve_features", "write_feature_set"]
