"""Pure-PyTorch reference of TokenCarve: the executable form of SPEC.md, one function per step.

Readable and computed in float64 wherever rounding could change a selection; every kernel in
`tokencarve_kernels` is tested against these functions.
"""

from .carve import carve, carve_varlen
from .embedding_carve import embedding_carve
from .gather_kv import gather_kv, kept_positions
from .info_scores import (
    authors_info_scores,
    gaussian_sketch,
    info_scores,
    info_scores_gram,
    info_scores_randomized,
    info_scores_svd,
)
from .last_query_attention import eager_last_query_attention, last_query_attention, last_query_attention_varlen
from .merge import MERGE_MODES, cosine_similarity, merge
from .select import budget_split, descending_ranks, fuse_ranks, select

__all__ = [
    "MERGE_MODES",
    "authors_info_scores",
    "budget_split",
    "carve",
    "carve_varlen",
    "cosine_similarity",
    "descending_ranks",
    "eager_last_query_attention",
    "embedding_carve",
    "fuse_ranks",
    "gather_kv",
    "gaussian_sketch",
    "info_scores",
    "info_scores_gram",
    "info_scores_randomized",
    "info_scores_svd",
    "kept_positions",
    "last_query_attention",
    "last_query_attention_varlen",
    "merge",
    "select",
]
