"""TokenCarve visual-token compression as `torch.ops.tokencarve.*` ops.

Public entry points (shapes in their docstrings): carve, carve_varlen, info_scores, last_query_attention,
last_query_attention_varlen, select, merge, gather_kv; embedding_carve (the variant that runs before
the LLM, for serving engines) and cls_query_and_keys; use_backend switches the implementation behind
the ops (see backend.py).
"""

from .backend import BACKENDS, use_backend
from .embedding_carve import cls_query_and_keys, embedding_carve
from .ops import (
    carve,
    carve_varlen,
    gather_kv,
    info_scores,
    last_query_attention,
    last_query_attention_varlen,
    merge,
    select,
)

__all__ = [
    "BACKENDS",
    "carve",
    "carve_varlen",
    "cls_query_and_keys",
    "embedding_carve",
    "gather_kv",
    "info_scores",
    "last_query_attention",
    "last_query_attention_varlen",
    "merge",
    "select",
    "use_backend",
]
