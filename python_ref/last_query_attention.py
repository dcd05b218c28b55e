"""Stage 0: the attention score of each visual token (SPEC.md, "Where it runs").

a_i = mean_h softmax_j(scale * q_h . k_j)[vis_start + i]: the post-softmax attention of the last input
token, over all N keys (so `a` does not sum to 1 over the visual span), averaged over the query heads.
Computed from q of the last token and the layer's keys: no N x N matrix.
"""

import torch


def last_query_attention(
    q: torch.Tensor, k: torch.Tensor, vis_start: int, vis_len: int, scale: float,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """q [B, Hq, d] (the last token's queries), k [B, Hk, N, d] -> a [B, vis_len] float32.

    Grouped-query attention: Hq = g * Hk, query head h reads key head h // g. Keys after RoPE,
    exactly as the attention kernel sees them. Computed in float64; `compute_dtype` runs the same
    formula in another dtype (the tests' error budget: a kernel may err at most twice as much as this
    reference run in the input's own precision).
    """
    batch, heads_q, head_dim = q.shape
    heads_k, num_keys = k.shape[1], k.shape[2]
    group = heads_q // heads_k
    keys = k.to(compute_dtype).repeat_interleave(group, dim=1)            # [B, Hq, N, d]
    logits = torch.einsum("bhd,bhnd->bhn", q.to(compute_dtype), keys) * scale   # [B, Hq, N]
    probs = torch.softmax(logits, dim=-1).mean(dim=1)                     # [B, N]
    return probs[:, vis_start : vis_start + vis_len].float()


def eager_last_query_attention(
    q_all: torch.Tensor, k: torch.Tensor, vis_start: int, vis_len: int, scale: float
) -> torch.Tensor:
    """The authors' route: the full causal N x N attention matrix (eager attention), then its last row.

    q_all [B, Hq, N, d], k [B, Hk, N, d] -> a [B, vis_len] float32. A baseline for benchmarks.
    """
    group = q_all.shape[1] // k.shape[1]
    keys = k.repeat_interleave(group, dim=1)
    logits = q_all @ keys.transpose(-1, -2) * scale                        # [B, Hq, N, N]
    n = logits.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=k.device).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    return probs[:, :, -1, vis_start : vis_start + vis_len].mean(dim=1).float()


def last_query_attention_varlen(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """Packed sequences: q [S, Hq, d] (each sequence's last token), k [total, Hk, d], cu_seqlens [S + 1]
    -> p [total] float32, p[j] = mean_h softmax over sequence s's keys of (scale * q_s,h . k_j), for the
    keys j of sequence s = [cu_seqlens[s], cu_seqlens[s + 1]). Keys outside every sequence get 0.

    The whole attention row of each sequence comes back (not one span): a prompt's images are sliced
    from it by the caller, all scored by the same last query.
    """
    out = torch.zeros(k.shape[0], dtype=torch.float32, device=k.device)
    bounds = cu_seqlens.tolist()
    for s in range(q.shape[0]):
        lo, hi = bounds[s], bounds[s + 1]
        if hi > lo:
            keys = k[lo:hi].transpose(0, 1)[None]                         # [1, Hk, n, d]
            out[lo:hi] = last_query_attention(q[s : s + 1], keys, 0, hi - lo, scale)[0]
    return out
