"""The public entry points: thin wrappers over `torch.ops.tokencarve.*` with shapes in their docstrings.

The ops never raise on floating-point values and are sync-free on a GPU (but for the exact information
score's eigh: one sync per image); the wrappers add the one check that must read values (`check_finite`, on
by default), which syncs a GPU once per call. Pass check_finite=False
in CUDA-graph capture or torch.compile regions; then non-finite inputs are ranked last deterministically.
"""

import math

import torch

from . import _C  # noqa: F401  (loads the library that registers the ops)

_ops = torch.ops.tokencarve


def _check_finite(**tensors: torch.Tensor) -> None:
    """Raise ValueError naming the first tensor that holds NaN or Inf: one host sync for all of them."""
    named = {name: t for name, t in tensors.items() if t is not None and t.is_floating_point()}
    if not named:
        return
    if len({t.device for t in named.values()}) > 1:  # the op names the device mismatch; nothing to stack here
        return
    finite = torch.stack([torch.isfinite(t).all() for t in named.values()])
    if bool(finite.all()):
        return
    name = next(name for name, ok in zip(named, finite.tolist()) if not ok)
    raise ValueError(f"{name} holds NaN or Inf; pass check_finite=False to rank such tokens last instead")


def info_scores(hidden: torch.Tensor, rank: int = 0, seed: int = 0, *, check_finite: bool = True) -> torch.Tensor:
    """Information contribution score of each visual token.

    hidden [B, Nv, D] float32/float16/bfloat16/float64 -> c [B, Nv] float32, c_i = sum_j |U_ij| S_j for the
    thin SVD X = U S V^T of each image's hidden states. rank = 0: exact (float64 Gram + eigh);
    rank > 0: randomized range finder of that rank, deterministic for a given seed.
    A token with a non-finite hidden state gets NaN (ranked last by `select`).
    """
    if check_finite:
        _check_finite(hidden=hidden)
    return _ops.info_scores(hidden, rank, seed)


def last_query_attention(
    q: torch.Tensor, k: torch.Tensor, vis_start: int, vis_len: int, scale: float, *, check_finite: bool = True
) -> torch.Tensor:
    """Head-mean post-softmax attention of the last token over the visual keys, without an N x N matrix.

    q [B, Hq, d] (queries of the last input token), k [B, Hk, N, d] (keys after RoPE), Hq = g * Hk
    -> a [B, vis_len] float32, a_i = mean_h softmax_j(scale * q_h . k_j)[vis_start + i]; the softmax
    runs over all N keys.
    """
    if check_finite:
        _check_finite(q=q, k=k)
    return _ops.last_query_attention(q, k, vis_start, vis_len, scale)


def select(
    attn: torch.Tensor, info: torch.Tensor, budget: int, attn_weight: float = 0.5, *, check_finite: bool = True
) -> torch.Tensor:
    """Stage I: fuse the two scores by rank and keep the K1 = min(int(1.5 * budget), Nv) best tokens.

    attn [B, Nv], info [B, Nv] -> order [B, K1] int64, token indices by descending fused score
    s_i = w (Nv - r_a(i)) + (1 - w) (Nv - r_c(i)), w = attn_weight; ties by lower token index.
    order[:, :K1 // 2] are the merge destinations, the rest the merge sources.
    """
    if check_finite:
        _check_finite(attn=attn, info=info)
    return _ops.select(attn, info, budget, attn_weight)


def merge(
    hidden: torch.Tensor,
    order: torch.Tensor,
    budget: int,
    mode: str = "mean",
    sizes: torch.Tensor | None = None,
    *,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage II: merge the r = K1 - T sources most similar to a destination into it, then compact.

    hidden [B, Nv, D], order [B, K1] int64 (from `select`), sizes [B, Nv] or None (all ones)
    -> carved [B, T, D] in hidden's dtype, keep_idx [B, T] int64 ascending, carved_sizes [B, T] float32,
    T = min(budget, Nv). mode: "mean" (paper-exact), "similarity" or "size" (see python_ref.merge).
    """
    if check_finite:
        _check_finite(hidden=hidden, sizes=sizes)
    return _ops.merge(hidden, order, budget, mode, sizes)


def carve(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    budget: int,
    attn_weight: float = 0.5,
    rank: int = 0,
    seed: int = 0,
    merge: str = "mean",
    *,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenCarve on one visual span per sample: score, prune to K1, merge down to T.

    hidden [B, Nv, D] float32/float16/bfloat16/float64 (the visual rows of the layer output),
    attn [B, Nv] (from `last_query_attention`)
    -> carved [B, T, D] in hidden's dtype, keep_idx [B, T] int64 ascending original indices,
    T = min(budget, Nv); budget >= Nv returns hidden unchanged with keep_idx = arange(Nv).
    attn_weight weighs the attention rank against the information rank (1: attention only, 0: information
    only); rank > 0 uses randomized information scores seeded by `seed`; merge is "mean" (paper-exact),
    "similarity" or "size". Output shapes depend only on input shapes and budget: no host sync.
    """
    if check_finite:
        _check_finite(hidden=hidden, attn=attn)
    return _ops.carve(hidden, attn, budget, attn_weight, rank, seed, merge)


def last_query_attention_varlen(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, *, check_finite: bool = True
) -> torch.Tensor:
    """The packed (varlen) form: each sequence's last-token attention over its own keys, head-mean.

    q [S, Hq, d] (last token of each sequence), k [total, Hk, d] (keys of all sequences, packed),
    cu_seqlens [S + 1] int32/int64 (sequence s owns keys [cu_seqlens[s], cu_seqlens[s + 1]))
    -> p [total] float32: the whole attention row of each sequence; slice each image's span from it.
    """
    if check_finite:
        _check_finite(q=q, k=k)
    return _ops.last_query_attention_varlen(q, k, cu_seqlens, scale)


def ratio_budget(ratio: float, num_visual: int) -> int:
    """Tokens kept of an image of num_visual tokens at ratio (0, 1]: max(1, ratio * Nv rounded half up)."""
    return max(1, math.floor(ratio * num_visual + 0.5))


def carve_varlen(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    seqlens: list[int],
    budgets: list[int] | None = None,
    *,
    ratio: float | None = None,
    attn_weight: float = 0.5,
    rank: int = 0,
    seed: int = 0,
    merge: str = "mean",
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of different sizes packed along one axis (LLaVA-NeXT tiles, serving batches), each carved alone.

    hidden [sum Nv_i, D], attn [sum Nv_i], seqlens = [Nv_i] (host ints: output shapes must not depend on data)
    and either budgets = [T_i] or ratio (T_i = ratio_budget(ratio, Nv_i))
    -> carved [sum min(T_i, Nv_i), D], keep_idx [sum min(T_i, Nv_i)] int64, indices within image i, ascending.
    """
    if (budgets is None) == (ratio is None):
        raise ValueError("carve_varlen: pass exactly one of budgets (one per image) or ratio")
    if ratio is not None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"carve_varlen: ratio must be in (0, 1], got {ratio}")
        budgets = [ratio_budget(ratio, n) for n in seqlens]
    if check_finite:
        _check_finite(hidden=hidden, attn=attn)
    return _ops.carve_varlen(hidden, attn, list(seqlens), list(budgets), attn_weight, rank, seed, merge)


def gather_kv(kv: torch.Tensor, keep_idx: torch.Tensor, vis_start: torch.Tensor, vis_len: int) -> torch.Tensor:
    """Keep the carved tokens in any per-token tensor: a layer's K or V cache, position ids, hidden states.

    kv [B, H, N, d] (any dtype), keep_idx [B, T] int64 (from carve), vis_start [B] int64 (each sample's
    visual offset, e.g. after left padding) -> [B, H, N - vis_len + T, d]: the tokens before and after
    the span unchanged, inside it only keep_idx, in order.
    """
    return _ops.gather_kv(kv, keep_idx, vis_start, vis_len)
