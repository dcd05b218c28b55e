"""Stage II of TokenCarve: merge part of the survivors into their most similar kept tokens.

SPEC.md, "merge". The similarity is the cosine of the hidden states, computed in float64 and rounded
to float32 before any comparison: implementations that sum in another order then still agree on every
argmax and on the merge order (a difference far below float32 resolution cannot flip a comparison,
and near-ties become exact ties that the tie rules settle).
"""

import torch

from .select import budget_split

MERGE_MODES = ("mean", "similarity", "size")


def cosine_similarity(hidden: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """S[b, i, j] = cos(hidden[b, src[b, i]], hidden[b, dst[b, j]]) as float32 from a float64 computation.

    hidden [B, Nv, D], src [B, nB] int64, dst [B, nA] int64 -> S [B, nB, nA] float32.
    A zero row has similarity 0 with everything. A row with a non-finite entry has similarity
    -inf with everything (it is never anyone's best match and merges last).
    """
    x = hidden.double()
    finite = torch.isfinite(x).all(dim=-1)
    x = torch.where(finite[..., None], x, 0.0)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)

    def rows(idx):
        return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))

    sim = torch.bmm(rows(src), rows(dst).transpose(1, 2)).float()
    bad = ~(torch.gather(finite, 1, src)[:, :, None] & torch.gather(finite, 1, dst)[:, None, :])
    return sim.masked_fill(bad, float("-inf"))


def merge(
    hidden: torch.Tensor,
    order: torch.Tensor,
    budget: int,
    mode: str = "mean",
    sizes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage II and compaction.

    hidden [B, Nv, D] (any float dtype), order [B, K1] int64 from `select` ->
      carved [B, T, D] in hidden's dtype, keep_idx [B, T] int64 ascending, carved_sizes [B, T] float32.

    Sets: A = order[:, :nA] (destinations), Bs = order[:, nA:] (sources), nA = K1 // 2.
    For each source b: m_b = max_a S[b, a], t_b = argmax_a S[b, a] (ties: lowest A position).
    The r = K1 - T sources with the largest m_b (ties: earlier in Bs) merge into t_b; the other
    sources are kept unchanged. Modes, with n_a sources merged into destination a:
      "mean"        h_a <- (h_a + sum_b h_b) / (1 + n_a)                 (paper-exact, default)
      "similarity"  h_a <- (h_a + sum_b w_b h_b) / (1 + sum_b w_b),  w_b = max(m_b, 0)
      "size"        h_a <- (s_a h_a + sum_b s_b h_b) / (s_a + sum_b s_b) (ToMe's size-weighted mean)
    `sizes` [B, Nv] (default all ones) is how many original tokens each input token stands for; it
    weighs only the "size" mode, where all-ones sizes give the "mean" result. carved_sizes is
    s_a + sum_b s_b for a destination, s_b for a kept source, in every mode, so repeated carving composes.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {mode!r}")
    batch, num_visual, dim = hidden.shape
    t_out, k1, n_a, r = budget_split(num_visual, budget)
    if order.shape != (batch, k1):
        raise ValueError(f"order must have shape [{batch}, {k1}], got {list(order.shape)}")
    if sizes is None:
        sizes = torch.ones(batch, num_visual, dtype=torch.float64, device=hidden.device)
    sizes = sizes.double()

    x = hidden.double()
    dst, src = order[:, :n_a], order[:, n_a:]
    x_dst = torch.gather(x, 1, dst[..., None].expand(-1, -1, dim))
    x_src = torch.gather(x, 1, src[..., None].expand(-1, -1, dim))
    s_dst, s_src = torch.gather(sizes, 1, dst), torch.gather(sizes, 1, src)
    w_dst = s_dst if mode == "size" else torch.ones_like(s_dst)
    num, den, new_size = x_dst * w_dst[..., None], w_dst, s_dst
    merged = torch.zeros(src.shape, dtype=torch.bool, device=hidden.device)
    if r > 0:  # (r = 0 also covers nA = 0, where there is nothing to merge into)
        sim = cosine_similarity(hidden, src, dst)                         # [B, nB, nA]
        best = sim.max(dim=-1).values                                     # m_b
        a_pos = torch.arange(n_a, device=hidden.device).expand_as(sim)
        target = torch.where(sim == best[..., None], a_pos, n_a).min(dim=-1).values  # t_b, lowest A pos
        # Sources by descending m_b, ties by B position: the first r merge.
        merge_rank = torch.sort(-best.double(), dim=-1, stable=True).indices
        merged.scatter_(1, merge_rank[:, :r], True)
        w_src = {"mean": torch.ones_like(s_src), "similarity": best.double().clamp_min(0.0), "size": s_src}[mode]
        w_src = torch.where(merged, w_src, 0.0)
        contrib = torch.where(merged[..., None], x_src * w_src[..., None], 0.0)  # kept sources add nothing
        num = num.scatter_add(1, target[..., None].expand(-1, -1, dim), contrib)
        den = den.scatter_add(1, target, w_src)
        new_size = new_size.scatter_add(1, target, torch.where(merged, s_src, 0.0))
    new_dst = num / den[..., None]

    # Compaction: A plus the unmerged sources, back in ascending original order.
    kept_src = torch.where(merged, num_visual, src)          # merged sources sort past every real index
    cand_idx = torch.cat([dst, kept_src], dim=1)              # [B, K1]
    cand_rows = torch.cat([new_dst, x_src], dim=1)
    cand_sizes = torch.cat([new_size, s_src], dim=1)
    pick = torch.sort(cand_idx, dim=1).indices[:, :t_out]
    keep_idx = torch.gather(cand_idx, 1, pick)
    carved = torch.gather(cand_rows, 1, pick[..., None].expand(-1, -1, dim)).to(hidden.dtype)
    return carved, keep_idx, torch.gather(cand_sizes, 1, pick).float()
