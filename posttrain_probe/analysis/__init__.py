"""Analysis of trained crosscoders: attribution metrics (SPEC sec. 4) and per-feature tables.

Imports torch, numpy and pyarrow only; plotting (matplotlib) and scipy are imported where used.
"""

from posttrain_probe.analysis.attribution import (
    BASE_ONLY_ABOVE,
    CATEGORIES,
    FINETUNE_ONLY_BELOW,
    categorize,
    decoder_cosine,
    decoder_norms,
    latent_scaling,
    mas,
    mas_dominant,
    norm_ratio,
    nrn,
)
from posttrain_probe.analysis.dynamics import (
    DEFAULT_K,
    FeatureMatching,
    MatchQuality,
    RankShifts,
    align_scores,
    checkpoint_scores,
    match_features,
    rank_shifts,
    top_k_sets,
    topk_overlap,
)
from posttrain_probe.analysis.features import (
    NRN_TAILS,
    FeatureStats,
    feature_activation_stats,
    feature_table,
    model_index,
    summary,
    write_table,
)

__all__ = [
    "DEFAULT_K",
    "FeatureMatching",
    "MatchQuality",
    "RankShifts",
    "align_scores",
    "checkpoint_scores",
    "match_features",
    "rank_shifts",
    "top_k_sets",
    "topk_overlap",
    "BASE_ONLY_ABOVE",
    "CATEGORIES",
    "FINETUNE_ONLY_BELOW",
    "NRN_TAILS",
    "FeatureStats",
    "categorize",
    "decoder_cosine",
    "decoder_norms",
    "feature_activation_stats",
    "feature_table",
    "latent_scaling",
    "mas",
    "mas_dominant",
    "model_index",
    "norm_ratio",
    "nrn",
    "summary",
    "write_table",
]
