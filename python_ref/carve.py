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


def carve_varlen(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    seqlens: list[int],
    budgets: list[int],
    attn_weight: float = 0.5,
    rank: int = 0,
    seed: int = 0,
    merge_mode: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of different sizes packed along one axis, each carved on its own with its own budget.

    hidden [sum Nv_i, D], attn [sum Nv_i], seqlens = [Nv_i], budgets = [T_i]
    -> carved [sum min(T_i, Nv_i), D], keep_idx [sum min(T_i, Nv_i)] int64 (indices within image i).
    """
    carved, keep = [], []
    for image_h, image_a, budget in zip(hidden.split(seqlens), attn.split(seqlens), budgets):
        c, k = carve(image_h[None], image_a[None], budget, attn_weight, rank, seed, merge_mode)
        carved.append(c[0])
        keep.append(k[0])
    return torch.cat(carved), torch.cat(keep)
