"""Analysis of trained crosscoders: attribution metrics (docs/methods.md sec. 4), per-feature tables, checkpoint
dynamics. The steps ``analyze`` and ``dynamics`` are functions of :mod:`posttrain_probe.analysis.report`
(not exported here: ``dynamics`` is also a submodule).

The configs are imported eagerly (torch-free); everything else (torch, numpy, pyarrow) on first use, so the
command line builds its options without importing torch.
"""

from posttrain_probe.analysis.analyze_config import DEFAULT_K, NORM_RATIO_SCALES, AnalyzeConfig, DynamicsConfig
from posttrain_probe.lazy import lazy_attributes

__all__ = [
    "AnalysisResult",
    "AnalyzeConfig",
    "BASE_ONLY_ABOVE",
    "CATEGORIES",
    "DEFAULT_K",
    "DuplicateGroups",
    "DynamicsConfig",
    "DynamicsResult",
    "FINETUNE_ONLY_BELOW",
    "FeatureMatching",
    "FeatureStats",
    "MatchQuality",
    "NORM_RATIO_SCALES",
    "NRN_TAILS",
    "RankShifts",
    "SharedIndex",
    "TopKTies",
    "categorize",
    "checkpoint_scores",
    "decoder_cosine",
    "decoder_norms",
    "duplicate_groups",
    "feature_activation_stats",
    "feature_table",
    "indexed_scores",
    "latent_scaling",
    "mas",
    "mas_dominant",
    "match_features",
    "model_index",
    "negligible_features",
    "norm_ratio",
    "nrn",
    "rank_shifts",
    "shared_index",
    "summary",
    "top_k_sets",
    "top_k_ties",
    "topk_overlap",
    "write_table",
]

_LAZY = {
    "AnalysisResult": "report",
    "BASE_ONLY_ABOVE": "attribution",
    "CATEGORIES": "attribution",
    "DuplicateGroups": "duplicates",
    "DynamicsResult": "checkpoint_dynamics",
    "FINETUNE_ONLY_BELOW": "attribution",
    "FeatureMatching": "dynamics",
    "FeatureStats": "features",
    "MatchQuality": "dynamics",
    "NRN_TAILS": "features",
    "RankShifts": "dynamics",
    "SharedIndex": "dynamics",
    "TopKTies": "dynamics",
    "categorize": "attribution",
    "checkpoint_scores": "dynamics",
    "decoder_cosine": "attribution",
    "decoder_norms": "attribution",
    "duplicate_groups": "duplicates",
    "feature_activation_stats": "features",
    "feature_table": "features",
    "indexed_scores": "dynamics",
    "latent_scaling": "attribution",
    "mas": "attribution",
    "mas_dominant": "attribution",
    "match_features": "dynamics",
    "model_index": "features",
    "negligible_features": "dynamics",
    "norm_ratio": "attribution",
    "nrn": "attribution",
    "rank_shifts": "dynamics",
    "shared_index": "dynamics",
    "summary": "features",
    "top_k_sets": "dynamics",
    "top_k_ties": "dynamics",
    "topk_overlap": "dynamics",
    "write_table": "features",
}

__getattr__ = lazy_attributes(__name__, _LAZY)
