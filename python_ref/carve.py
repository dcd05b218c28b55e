"""TokenCarve end to end for one visual span per sample (SPEC.md, stages 0 to II)."""

import torch

from .info_scores import info_scores
from .merge import merge
from .select import select


def carve(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    budget: int,
    attn_weight: float = 0.5,
    rank: int = 0,
    seed: int = 0,
    merge_mode: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, Nv, D], attn [B, Nv] -> carved [B, T, D] (hidden's dtype), keep_idx [B, T] int64.

    T = min(budget, Nv). keep_idx holds ascending original visual indices; carved[b, j] is the
    (possibly merged) hidden state of token keep_idx[b, j]. budget >= Nv returns hidden unchanged.
    attn_weight = 1 needs no information score (attention only, FastV-like), so none is computed.
    """
    if attn_weight == 1.0:
        info = torch.zeros(attn.shape, dtype=torch.float32, device=attn.device)
    else:
        info = info_scores(hidden, rank=rank, seed=seed)
    order = select(attn, info, budget, attn_weight)
    carved, keep_idx, _ = merge(hidden, order, budget, merge_mode)
    return carved, keep_idx
