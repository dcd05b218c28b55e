"""Stage 0.5 and stage I of TokenCarve: rank fusion and pruning (SPEC.md, "fusion" and "prune").

Everything here is integer bookkeeping over scores, so it is exact: any implementation that follows
the tie rules below must return the same indices, bit for bit.
"""

import torch


def budget_split(num_visual: int, budget: int) -> tuple[int, int, int, int]:
    """The sizes of every stage for one image, a pure function of (Nv, T).

    Returns (T_out, K1, nA, r):
      T_out = min(budget, Nv)              tokens that come out of carve
      K1    = min(int(1.5 * T), Nv)        survivors of stage I (K1 = Nv when T >= Nv)
      nA    = int(K1 / 2)                  destinations (set A); |B| = K1 - nA sources
      r     = K1 - T_out                   sources merged in stage II (0 when T >= Nv)
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if budget >= num_visual:
        return num_visual, num_visual, num_visual // 2, 0
    k1 = min((3 * budget) // 2, num_visual)  # == int(1.5 * budget) for every int budget
    return budget, k1, k1 // 2, k1 - budget


def descending_ranks(score: torch.Tensor) -> torch.Tensor:
    """0-based position of each token when `score` is sorted in descending order.

    score [B, Nv] any float dtype -> ranks [B, Nv] int64.
    Ties keep ascending token index (a stable sort). Non-finite values (NaN, +-Inf) all rank
    after every finite value, among themselves by ascending token index.
    """
    key = torch.where(torch.isfinite(score), score.double(), float("-inf"))
    # An ascending stable sort of -key is a descending sort in which equal keys keep token order.
    order = torch.sort(-key, dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def fuse_ranks(attn: torch.Tensor, info: torch.Tensor, attn_weight: float = 0.5) -> torch.Tensor:
    """IPGS fused score s_i = lam * (Nv - r_a(i)) + (1 - lam) * (Nv - r_c(i)), lam = attn_weight.

    attn [B, Nv], info [B, Nv] -> fused [B, Nv] float64.
    Computed in float64 as exactly these operations (two products, then one sum, no fused
    multiply-add) so that every implementation produces the same values and hence the same ties.
    """
    num_visual = attn.shape[-1]
    r_a = descending_ranks(attn).double()
    r_c = descending_ranks(info).double()
    lam = float(attn_weight)
    return lam * (num_visual - r_a) + (1.0 - lam) * (num_visual - r_c)


def select(attn: torch.Tensor, info: torch.Tensor, budget: int, attn_weight: float = 0.5) -> torch.Tensor:
    """Stage I: the K1 tokens with the largest fused score, ordered by descending fused score.

    attn [B, Nv], info [B, Nv] -> order [B, K1] int64 (the list P of SPEC.md).
    Ties in the fused score: lower token index first. order[:, :nA] is set A (merge
    destinations), order[:, nA:] is set B (merge sources); see `budget_split`.
    """
    _, k1, _, _ = budget_split(attn.shape[-1], budget)
    fused = fuse_ranks(attn, info, attn_weight)
    return torch.sort(-fused, dim=-1, stable=True).indices[:, :k1]
