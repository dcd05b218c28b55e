"""Triton kernels for the attention score: the last token's post-softmax attention, mean over query heads.

Two passes over the keys, never an N x N matrix nor a [B, Hq, N] buffer:
  1. `_softmax_stats_kernel`, one program per (key chunk, sequence, key head): an online softmax over the
     chunk's keys for the g query heads that read this key head; it stores the chunk's running max and
     sum of exponentials, [S, Hq, chunks] fp64 (what the cross-chunk reduction needs, chunks = N / 512).
  2. `_head_mean_probs_kernel`, one program per (block of output keys, sequence): for every key head it
     combines the chunk statistics of its query heads (in chunk order, so the result does not depend on
     scheduling), recomputes the logits of its keys, and adds exp(logit - max) / sum over the heads in
     registers; the head mean is stored once. No atomics: the output is deterministic.
Pass 2 reads only the keys it writes (the visual span), so the keys are read about 1 + vis_len / N times.

Precision: fp16/bf16 q . k run on the tensor cores with an fp32 accumulator (their products are exact
in fp32); fp32/fp64 inputs take an fp64 dot (on H100/H200 the fp64 tensor-core rate equals the IEEE-fp32
FMA rate, and the kernel is bound by reading K). Everything after the dot is float64: there are only
N x Hq exponentials against N x Hq x d multiply-adds, and an fp32 softmax (a sum over thousands of keys,
rescaled at each new maximum) measured 3x the error of torch's own fp32 softmax on 600 keys. Maxima are
kept in q . k units and the scale multiplies the difference, exp((s - max) * scale). The scale reaches the
kernels as a one-element float64 tensor: a Python float argument would be typed float32 by Triton.

Shared memory: the fp64 dot path stages a key tile of BLOCK_N x BLOCK_D doubles; at head_dim 256 a 64-key tile
is 128 KB, and pipelined (num_stages 3) it exceeds the 227 KB of an H100/H200, so that path takes 32-key tiles
in one stage from BLOCK_D = 256 up (`_tiling`). Offsets of keys and heads are int64: one sample's K may hold
more than 2^31 elements.

The same two kernels serve the dense form (k [B, Hk, N, d], one visual span per sample) and the packed
form (k [total, Hk, d] with `cu_seqlens`, each sequence's whole row), switched by IS_VARLEN. The kernels clamp
each sequence's bounds to [0, total] (hi >= lo), so cu_seqlens values outside the caller's promise cannot make
them read or write outside k and the output (on the device, no sync).

Not done yet: the varlen grids are sized by the total number of keys for every sequence (programs past a
sequence's end exit at once, but the launch costs S x total programs); a `max_seqlen` argument would bound
them by the longest sequence. It changes the op schema, so it waits.
"""

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_device, device_guard, next_pow2

# Keys per program in pass 1 (a loop of KEYS_BLOCK-key steps inside): few enough programs that pass 2
# combines few chunks, enough that a long prompt still fills the GPU.
CHUNK = 512
KEYS_BLOCK = 64
# Output keys per program in pass 2 (LLaVA's 576 visual keys -> 18 programs per sample).
OUT_BLOCK = 32


@triton.jit
def _load_group_queries(q_ptr, seq, head_k, stride_qs, stride_qh, stride_qd, GROUP: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The queries of the g heads that read key head `head_k`: [BLOCK_G, BLOCK_D], zero-padded."""
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    ptrs = q_ptr + seq.to(tl.int64) * stride_qs + (head_k * GROUP + g)[:, None] * stride_qh + d[None, :] * stride_qd
    q = tl.load(ptrs, mask=(g[:, None] < GROUP) & (d[None, :] < HEAD_DIM), other=0.0)
    return q.to(DOT_DTYPE)


@triton.jit
def _sequence_keys(cu_ptr, seq, num_keys, IS_VARLEN: tl.constexpr):
    """(first key row, number of keys) of sequence `seq`, int64: a slice of the packed keys, or all N keys.

    Varlen: cu_seqlens is the caller's promise, unchecked (a check would sync), so the bounds are clamped to
    [0, total] with hi >= lo: bad values give wrong rows, never an access outside k or out."""
    if IS_VARLEN:
        lo = tl.load(cu_ptr + seq).to(tl.int64)
        hi = tl.load(cu_ptr + seq + 1).to(tl.int64)
        lo = tl.minimum(tl.maximum(lo, 0), num_keys)
        hi = tl.minimum(tl.maximum(hi, lo), num_keys)
        return lo, hi - lo
    return seq.to(tl.int64) * 0, num_keys


@triton.jit
def _softmax_stats_kernel(
    q_ptr, k_ptr, cu_ptr, scale_ptr, max_ptr, sum_ptr,
    num_keys, num_chunks,
    stride_qs, stride_qh, stride_qd, stride_ks, stride_kn, stride_kh, stride_kd,
    HEADS_Q: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    chunk = tl.program_id(0)
    seq = tl.program_id(1)
    head_k = tl.program_id(2)
    scale = tl.load(scale_ptr)
    key_lo, n = _sequence_keys(cu_ptr, seq, num_keys, IS_VARLEN)
    q = _load_group_queries(q_ptr, seq, head_k, stride_qs, stride_qh, stride_qd, GROUP, HEAD_DIM, BLOCK_G, BLOCK_D,
                            DOT_DTYPE)
    d = tl.arange(0, BLOCK_D)
    k_base = k_ptr + seq.to(tl.int64) * stride_ks + key_lo * stride_kn + head_k.to(tl.int64) * stride_kh
    running_max = tl.full([BLOCK_G], float("-inf"), tl.float64)
    running_sum = tl.zeros([BLOCK_G], tl.float64)
    # Every step starts at a valid key, so the running max is finite after the first one.
    for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, n), BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + keys.to(tl.int64)[:, None] * stride_kn + d[None, :] * stride_kd,
                    mask=(keys[:, None] < n) & (d[None, :] < HEAD_DIM), other=0.0)
        k = k.to(DOT_DTYPE)
        dots = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float64)
        dots = tl.where(keys[None, :] < n, dots, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(dots, axis=1))
        running_sum = (running_sum * tl.exp((running_max - new_max) * scale)
                       + tl.sum(tl.exp((dots - new_max[:, None]) * scale), axis=1))
        running_max = new_max
    g = tl.arange(0, BLOCK_G)
    stat = (seq.to(tl.int64) * HEADS_Q + head_k * GROUP + g) * num_chunks + chunk
    tl.store(max_ptr + stat, running_max, mask=g < GROUP)
    tl.store(sum_ptr + stat, running_sum, mask=g < GROUP)


@triton.jit
def _head_mean_probs_kernel(
    q_ptr, k_ptr, cu_ptr, scale_ptr, max_ptr, sum_ptr, out_ptr,
    num_keys, num_chunks, out_start, out_len,
    stride_qs, stride_qh, stride_qd, stride_ks, stride_kn, stride_kh, stride_kd, stride_os,
    HEADS_Q: tl.constexpr, HEADS_K: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    IS_VARLEN: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    block = tl.program_id(0)
    seq = tl.program_id(1)
    scale = tl.load(scale_ptr)
    key_lo, n = _sequence_keys(cu_ptr, seq, num_keys, IS_VARLEN)
    if IS_VARLEN:  # the whole row of each sequence, written at its packed positions
        out_start = 0
        out_len = n
    if block * BLOCK_V < out_len:
        cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < out_len
        keys = out_start + cols
        d = tl.arange(0, BLOCK_D)
        g = tl.arange(0, BLOCK_G)
        n_chunks = tl.cdiv(n, CHUNK)
        acc = tl.zeros([BLOCK_V], tl.float64)
        for head_k in range(HEADS_K):
            # Combine the chunk statistics of this group's query heads, in chunk order.
            row_max = tl.full([BLOCK_G], float("-inf"), tl.float64)
            row_sum = tl.zeros([BLOCK_G], tl.float64)
            stat = (seq.to(tl.int64) * HEADS_Q + head_k * GROUP + g) * num_chunks
            for c in range(n_chunks):
                chunk_max = tl.load(max_ptr + stat + c, mask=g < GROUP, other=0.0)
                chunk_sum = tl.load(sum_ptr + stat + c, mask=g < GROUP, other=1.0)  # padding rows: no 0 / 0
                new_max = tl.maximum(row_max, chunk_max)
                row_sum = (row_sum * tl.exp((row_max - new_max) * scale)
                           + chunk_sum * tl.exp((chunk_max - new_max) * scale))
                row_max = new_max
            q = _load_group_queries(q_ptr, seq, head_k, stride_qs, stride_qh, stride_qd, GROUP, HEAD_DIM, BLOCK_G,
                                    BLOCK_D, DOT_DTYPE)
            k_base = k_ptr + seq.to(tl.int64) * stride_ks + key_lo * stride_kn + tl.cast(head_k, tl.int64) * stride_kh
            k = tl.load(k_base + keys.to(tl.int64)[:, None] * stride_kn + d[None, :] * stride_kd,
                        mask=col_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
            k = k.to(DOT_DTYPE)
            dots = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float64)
            probs = tl.exp((dots - row_max[:, None]) * scale) / row_sum[:, None]
            acc += tl.sum(tl.where((g[:, None] < GROUP) & col_ok[None, :], probs, 0.0), axis=0)
        out_base = out_ptr + key_lo + seq.to(tl.int64) * stride_os
        tl.store(out_base + cols, (acc / HEADS_Q).to(tl.float32), mask=col_ok)


def _dot_dtype(dtype: torch.dtype):
    if dtype in (torch.float16, torch.bfloat16):
        # The interpreter computes bf16 arithmetic on raw bit patterns: upcast right after the load.
        return tl.float32 if INTERPRET else (tl.float16 if dtype == torch.float16 else tl.bfloat16)
    return tl.float64


def _tiling(dot_dtype, block_d: int) -> tuple[int, dict]:
    """(keys per step of pass 1, launch options of both passes). From BLOCK_D = 256 the fp64 path takes 32-key
    tiles in one stage: a pipelined 64 x 256 fp64 key tile would not fit in shared memory (module docstring)."""
    if dot_dtype == tl.float64 and block_d >= 256:
        return 32, dict(num_stages=1)
    return KEYS_BLOCK, {}


def _launch(q, k, cu_seqlens, out, num_keys, out_start, out_len, scale, strides_k, stride_os):
    num_seqs, heads_q, head_dim = q.shape
    heads_k = k.shape[-2] if cu_seqlens is not None else k.shape[1]
    group = heads_q // heads_k
    num_chunks = triton.cdiv(num_keys, CHUNK)
    stats = torch.empty(2, num_seqs, heads_q, num_chunks, device=q.device, dtype=torch.float64)
    # A fill kernel, not a host-to-device copy: no sync, capturable in a CUDA graph.
    scale_t = torch.full((1,), scale, device=q.device, dtype=torch.float64)
    block_d = max(16, next_pow2(head_dim))
    dot_dtype = _dot_dtype(q.dtype)
    keys_block, options = _tiling(dot_dtype, block_d)
    meta = dict(HEADS_Q=heads_q, GROUP=group, HEAD_DIM=head_dim, IS_VARLEN=cu_seqlens is not None, CHUNK=CHUNK,
                BLOCK_G=max(16, next_pow2(group)), BLOCK_D=block_d, DOT_DTYPE=dot_dtype, **options)
    cu = cu_seqlens if cu_seqlens is not None else q  # an unused pointer in the dense form
    _softmax_stats_kernel[(num_chunks, num_seqs, heads_k)](
        q, k, cu, scale_t, stats[0], stats[1], num_keys, num_chunks, *q.stride(), *strides_k,
        BLOCK_N=keys_block, **meta)
    _head_mean_probs_kernel[(triton.cdiv(out_len, OUT_BLOCK), num_seqs)](
        q, k, cu, scale_t, stats[0], stats[1], out, num_keys, num_chunks, out_start, out_len, *q.stride(),
        *strides_k, stride_os, HEADS_K=heads_k, BLOCK_V=OUT_BLOCK, **meta)
    return out


def last_query_attention(q: torch.Tensor, k: torch.Tensor, vis_start: int, vis_len: int, scale: float) -> torch.Tensor:
    """q [B, Hq, d] (the last token's queries), k [B, Hk, N, d] (keys after RoPE), Hq = g * Hk
    -> a [B, vis_len] float32, a_i = mean_h softmax_j(scale * q_h . k_j)[vis_start + i] over all N keys.
    Arguments are checked by the caller (backend._checked)."""
    check_device(q)
    with device_guard(q):
        batch, _, _ = q.shape
        num_keys = k.shape[2]
        out = torch.empty(batch, vis_len, device=q.device, dtype=torch.float32)
        if out.numel() == 0:
            return out
        # k strides in (sequence, key, head, dim) order.
        strides_k = (k.stride(0), k.stride(2), k.stride(1), k.stride(3))
        return _launch(q, k, None, out, num_keys, vis_start, vis_len, scale, strides_k, out.stride(0))


def last_query_attention_varlen(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor,
                                scale: float) -> torch.Tensor:
    """Packed sequences: q [S, Hq, d] (each sequence's last token), k [total, Hk, d], cu_seqlens [S + 1]
    -> p [total] float32: each sequence's head-mean attention row over its own keys; keys outside every
    sequence get 0. cu_seqlens is read on the device: its values are the caller's promise (non-decreasing
    from 0 to at most total), not checked here, which would need a host sync; the kernels clamp them to
    [0, total] (hi >= lo), so bad values cannot reach outside k and p."""
    check_device(q)
    with device_guard(q):
        total = k.shape[0]
        out = torch.zeros(total, device=q.device, dtype=torch.float32)
        if total == 0 or q.shape[0] == 0:
            return out
        # Grids cover the longest possible sequence (all keys); programs past their sequence's end exit.
        strides_k = (0, k.stride(0), k.stride(1), k.stride(2))
        return _launch(q, k, cu_seqlens.contiguous(), out, total, 0, total, scale, strides_k, 0)


__all__ = ["last_query_attention", "last_query_attention_varlen"]
