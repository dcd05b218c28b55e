"""The public entry points: thin wrappers over `torch.ops.tokencarve.*` with shapes in their docstrings.

The ops themselves are sync-free and never raise on values; the wrappers add the one check that must
read values (`check_finite`, on by default), which syncs a GPU once per call. Pass check_finite=False
in CUDA-graph capture or torch.compile regions; then non-finite inputs are ranked last deterministically.
"""

import torch

from . import _C  # noqa: F401  (loads the library that registers the ops)

_ops = torch.ops.tokencarve


def _check_finite(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
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
