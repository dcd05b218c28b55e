"""TokenCarve visual-token compression as `torch.ops.tokencarve.*` ops.

Public entry points (shapes in their docstrings): carve, info_scores, last_query_attention, select,
merge; use_backend switches the implementation behind the ops (see backend.py).
"""

from .backend import BACKENDS, use_backend
from .ops import carve, info_scores, last_query_attention, merge, select

__all__ = ["BACKENDS", "carve", "info_scores", "last_query_attention", "merge", "select", "use_backend"]
