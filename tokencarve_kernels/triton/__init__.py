"""Triton kernels of the two scores, registered behind `torch.ops.tokencarve.*` by backend.py.

last_query_attention.py: the attention score (dense and varlen); info_scores.py: the information score
(exact and randomized). Importing this package needs triton; it runs on CUDA tensors, or on CPU tensors
under the Triton interpreter (TRITON_INTERPRET=1, set before the import).
"""

from .info_scores import info_scores
from .last_query_attention import last_query_attention, last_query_attention_varlen

__all__ = ["info_scores", "last_query_attention", "last_query_attention_varlen"]
