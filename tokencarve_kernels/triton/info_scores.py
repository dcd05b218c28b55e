"""Triton kernels for the information contribution score, c_i = sum_j |U_ij| S_j for X = U S V^T.

All arithmetic is float64 (operands are upcast right after each load): a Gram matrix squares the
condition number, and on the decaying spectra of real hidden states a float32 Gram + eigh changes the
selected tokens (python_ref.info_scores docstring; tests/test_info_scores.py checks the selections).

Exact (rank = 0), per image X [Nv, D]:
  Nv <= D: G = X X^T by `_matmul_kernel` (lower-triangle tiles only), G = Q L Q^T by torch.linalg.eigh,
           then `_row_l1_kernel` with DIAGONAL: c_i = sum_j |Q_ij| sqrt(max(L_j, 0)).
  Nv >  D: G = X^T X (D x D), G = V L V^T, then `_row_l1_kernel`: c_i = sum_j |(X V)_ij| without storing
           X V. The cost grows linearly in Nv.
Randomized (rank = k > 0): Y = X Omega with Omega [D, l] Gaussian regenerated inside `_matmul_kernel` from
(seed, row * l + col) by `_gaussian` (Philox4x32-10, Box-Muller in float64), so it is never stored;
POWER_ITERATIONS rounds of Y <- X (X^T Y) as GEMMs with a QR (torch.linalg.qr) between them; Qy = qr(Y);
B = Qy^T X; the l x l eigenproblem of B B^T; then `_row_l1_kernel`: c_i = sum_j |(Qy W_k sqrt(L_k))_ij|. The
sketch is python_ref.gaussian_sketch's, bit for bit, on every device and process (tensor-parallel ranks pick
the same tokens; see `_gaussian` for the one exception).

Batch invariance: the GEMM and row-L1 kernels compute each image's tiles on their own, but torch.linalg.eigh
on CUDA chooses its algorithm by batch size (cuSOLVER's batched Jacobi syevj for n <= 32 when B > 1) and qr's
backends may too, so both run once per image (`_eigh`, `_orthonormal`): an image's scores do not depend on the
rest of the batch (SPEC.md). That is B calls, a loop over a shape, not over data.

A token whose hidden state holds NaN/Inf: its row is read as zero by every GEMM (the `finite` mask from
`_finite_rows_kernel`) and its score is NaN, as in python_ref. The kernels never sync; torch.linalg.eigh
checks its error code on the host, once per image on CUDA (so the score ops cannot be captured in a CUDA graph).
"""

import dataclasses

import torch
import triton
import triton.language as tl

from python_ref.info_scores import POWER_ITERATIONS, sketch_cols

from ._common import INTERPRET, check_device, device_guard

# Which axis of an operand runs over tokens (and so is zeroed where a token is not finite).
_NO_MASK, _MASK_A_ROWS, _MASK_A_COLS = 0, 1, 2
_MASK_B_ROWS, _MASK_B_COLS = 1, 2


@triton.jit
def _gaussian(seed, offsets):
    """Omega entries at `offsets` (int32): N(0, 1) float32, python_ref.gaussian_sketch's formula.

    Philox4x32-10 words (integers: exact on every device) -> uniforms exact in float64, u1 = (w0 + 1) 2^-32 in
    (0, 1] (no log(0)) and u2 = w1 2^-32 in [0, 1) -> Box-Muller sqrt(-2 ln u1) cos(2 pi u2) in float64 -> one
    rounding to float32. A float64 sqrt is correctly rounded on every device (PTX has no approximate one). tl.log
    and tl.cos on float64 are libdevice's __nv_log / __nv_cos on NVIDIA (numpy's on the interpreter, glibc's in
    csrc/philox.h): not correctly rounded, they may differ in the last float64 bit or two, which the float32
    rounding absorbs unless the float64 value lies within ~1e-16 relative of a float32 rounding boundary (a few
    entries in 10^9): the best a sketch built on transcendental functions can do. A float32 Box-Muller (tl.randn:
    approximate log/cos on NVIDIA) would differ from the reference in many entries.
    """
    w0, w1, _, _ = tl.randint4x(seed, offsets)
    u1 = (w0.to(tl.float64) + 1.0) * 2.3283064365386963e-10
    u2 = w1.to(tl.float64) * 2.3283064365386963e-10
    two_pi = tl.full([], 6.283185307179586, tl.float64)  # a literal may be typed float32 (older Triton)
    return (tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(two_pi * u2)).to(tl.float32)


@triton.jit
def _finite_rows_kernel(x_ptr, finite_ptr, rows, cols, stride_xb, stride_xr, stride_xc,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """finite [B, Nv] int8: 1 where the token's whole hidden state is finite."""
    batch = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    bad = tl.zeros([BLOCK_R], tl.int32)
    base = x_ptr + batch.to(tl.int64) * stride_xb
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(base + r[:, None] * stride_xr + c[None, :] * stride_xc,
                    mask=(r[:, None] < rows) & (c[None, :] < cols), other=0.0).to(tl.float64)
        bad += tl.sum((~(tl.abs(x) < float("inf"))).to(tl.int32), axis=1)  # NaN compares false
    tl.store(finite_ptr + batch * rows + r, (bad == 0).to(tl.int8), mask=r < rows)


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, finite_ptr, M, N, K, seed,
    stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn, stride_cb, stride_cm, stride_cn,
    stride_fb,
    SKETCH: tl.constexpr, LOWER: tl.constexpr, MASK_A: tl.constexpr, MASK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C [B, M, N] float64 = A [B, M, K] @ B [B, K, N], accumulated in float64.

    SKETCH: B is the Gaussian sketch Omega[k, n] = _gaussian(seed, k * N + n), generated here, not read.
    LOWER: only tiles on or below the diagonal are written (BLOCK_M == BLOCK_N; eigh reads the lower half).
    MASK_A / MASK_B: the operand axis that runs over tokens; non-finite tokens (finite_ptr) read as zero.
    """
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    if (not LOWER) or pid_n <= pid_m:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        a_base = a_ptr + batch * stride_ab
        b_base = b_ptr + batch * stride_bb
        f_base = finite_ptr + batch * stride_fb
        if MASK_A == 1:
            a_rows_ok = tl.load(f_base + rm, mask=rm < M, other=0) != 0
        if MASK_B == 2:
            b_cols_ok = tl.load(f_base + rn, mask=rn < N, other=0) != 0
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float64)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_base + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0).to(tl.float64)
            if MASK_A == 1:
                a = tl.where(a_rows_ok[:, None], a, 0.0)
            if MASK_A == 2:
                a = tl.where(tl.load(f_base + rk, mask=rk < K, other=0)[None, :] != 0, a, 0.0)
            b_in = (rk[:, None] < K) & (rn[None, :] < N)
            if SKETCH:
                b = tl.where(b_in, _gaussian(seed, rk[:, None] * N + rn[None, :]), 0.0).to(tl.float64)
            else:
                b = tl.load(b_base + rk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=b_in,
                            other=0.0).to(tl.float64)
            if MASK_B == 1:
                b = tl.where(tl.load(f_base + rk, mask=rk < K, other=0)[:, None] != 0, b, 0.0)
            if MASK_B == 2:
                b = tl.where(b_cols_ok[None, :], b, 0.0)
            acc = tl.dot(a, b, acc)
        c_ptrs = c_ptr + batch * stride_cb + rm[:, None] * stride_cm + rn[None, :] * stride_cn
        tl.store(c_ptrs, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _row_l1_kernel(
    a_ptr, w_ptr, finite_ptr, out_ptr, M, J, K,
    stride_ab, stride_am, stride_ak, stride_wb, stride_wk, stride_wj, stride_fb,
    DIAGONAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out [B, M] float32: c_i = sum_j |(A W)_ij| for A [B, M, K], W [B, K, J] (the product stays in
    registers, one column block at a time); DIAGONAL: W is a vector w [B, J], c_i = sum_j |A_ij| w_j
    with A [B, M, J]. NaN where the token is not finite (its row of A reads as zero)."""
    batch = tl.program_id(1).to(tl.int64)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    finite = tl.load(finite_ptr + batch * stride_fb + rm, mask=rm < M, other=0) != 0
    a_base = a_ptr + batch * stride_ab
    w_base = w_ptr + batch * stride_wb
    l1 = tl.zeros([BLOCK_M], tl.float64)
    for j0 in range(0, J, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        if DIAGONAL:
            a = tl.load(a_base + rm[:, None] * stride_am + rj[None, :] * stride_ak,
                        mask=(rm[:, None] < M) & (rj[None, :] < J), other=0.0).to(tl.float64)
            w = tl.load(w_base + rj * stride_wj, mask=rj < J, other=0.0).to(tl.float64)
            l1 += tl.sum(tl.abs(a) * w[None, :], axis=1)
        else:
            tile = tl.zeros([BLOCK_M, BLOCK_J], tl.float64)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_base + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                            mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0).to(tl.float64)
                a = tl.where(finite[:, None], a, 0.0)
                w = tl.load(w_base + rk[:, None] * stride_wk + rj[None, :] * stride_wj,
                            mask=(rk[:, None] < K) & (rj[None, :] < J), other=0.0).to(tl.float64)
                tile = tl.dot(a, w, tile)
            l1 += tl.sum(tl.abs(tile), axis=1)
    tl.store(out_ptr + batch * M + rm, tl.where(finite, l1, float("nan")).to(tl.float32), mask=rm < M)


# Tile sizes. float64 tiles take twice the registers of float32 ones; 32 x 32 tiles give LLaVA's
# 576 x 576 Gram 171 lower-triangle programs (64 x 64 would give 45 on a 132-SM GPU). Not tuned on a
# GPU yet (benchmarks/study_eigensolvers.py times the Gram kernel there). The interpreter runs 64-wide blocks: its tl.dot
# is numpy's non-BLAS matmul loop (about 70 MFLOP/s), so its cost follows the flops, and wider
# lower-triangle tiles waste more of them on the diagonal.
def _gemm_blocks(m: int, n: int) -> dict:
    if INTERPRET:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
    block = 64 if triton.cdiv(m, 64) * triton.cdiv(n, 64) >= 256 else 32
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_K=16, num_warps=4, num_stages=3)


@dataclasses.dataclass(frozen=True)
class Sketch:
    """Omega [rows, cols], Omega[i, j] = _gaussian(seed, i * cols + j) (= python_ref.gaussian_sketch)."""

    seed: int
    rows: int
    cols: int


def finite_rows(hidden: torch.Tensor) -> torch.Tensor:
    """hidden [B, Nv, D] -> finite [B, Nv] int8."""
    batch, rows, cols = hidden.shape
    finite = torch.empty(batch, rows, device=hidden.device, dtype=torch.int8)
    block_r, block_c = (64, 256) if INTERPRET else (16, 128)
    _finite_rows_kernel[(triton.cdiv(rows, block_r), batch)](
        hidden, finite, rows, cols, *hidden.stride(), BLOCK_R=block_r, BLOCK_C=block_c)
    return finite


def matmul(a: torch.Tensor, b, finite: torch.Tensor, *, mask_a: int = _NO_MASK, mask_b: int = _NO_MASK,
           lower: bool = False) -> torch.Tensor:
    """a [B, M, K] (any float dtype, any strides) @ b [B, K, N] or a Sketch [K, N] -> [B, M, N] float64.

    lower: only the lower triangle (and the diagonal tiles) is computed; the rest stays zero.
    """
    batch, m, k = a.shape
    sketch = isinstance(b, Sketch)
    n = b.cols if sketch else b.shape[2]
    c = (torch.zeros if lower else torch.empty)(batch, m, n, device=a.device, dtype=torch.float64)
    blocks = _gemm_blocks(m, n)
    b_tensor, b_strides, seed = (a, (0, 0, 0), b.seed) if sketch else (b, b.stride(), 0)
    grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]), batch)
    _matmul_kernel[grid](
        a, b_tensor, c, finite, m, n, k, seed, *a.stride(), *b_strides, *c.stride(), finite.stride(0),
        SKETCH=sketch, LOWER=lower, MASK_A=mask_a, MASK_B=mask_b, **blocks)
    return c


def row_l1(a: torch.Tensor, w: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """a [B, M, K], w [B, K, J] -> sum_j |(a w)_ij| [B, M] float32; w [B, J] -> sum_j |a_ij| w_j."""
    batch, m, k = a.shape
    diagonal = w.dim() == 2
    j = w.shape[-1]
    out = torch.empty(batch, m, device=a.device, dtype=torch.float32)
    w_strides = (w.stride(0), 0, w.stride(1)) if diagonal else w.stride()
    blocks = dict(BLOCK_M=64, BLOCK_J=64, BLOCK_K=64) if INTERPRET else dict(BLOCK_M=32, BLOCK_J=32, BLOCK_K=16)
    _row_l1_kernel[(triton.cdiv(m, blocks["BLOCK_M"]), batch)](
        a, w, finite, out, m, j, k, *a.stride(), *w_strides, finite.stride(0), DIAGONAL=diagonal, **blocks)
    return out


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """y [B, M, l] -> an orthonormal basis of each image's columns [B, M, l], one QR per image (batch invariance)."""
    return torch.stack([torch.linalg.qr(image).Q for image in y.unbind(0)])


def _eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gram [B, n, n] (lower triangle) -> (eigenvalues [B, n] ascending, eigenvectors [B, n, n]), one eigh per
    image (batch invariance: module docstring)."""
    pairs = [torch.linalg.eigh(image, UPLO="L") for image in gram.unbind(0)]
    return torch.stack([p.eigenvalues for p in pairs]), torch.stack([p.eigenvectors for p in pairs])


def exact_scores(x: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """x [B, Nv, D] -> c [B, Nv] float32 by a float64 Gram matrix of the smaller side."""
    num_visual, dim = x.shape[1:]
    xt = x.transpose(1, 2)
    if num_visual <= dim:
        gram = matmul(x, xt, finite, mask_a=_MASK_A_ROWS, mask_b=_MASK_B_COLS, lower=True)
        evals, evecs = _eigh(gram)
        return row_l1(evecs, evals.clamp_min(0.0).sqrt(), finite)
    gram = matmul(xt, x, finite, mask_a=_MASK_A_COLS, mask_b=_MASK_B_ROWS, lower=True)
    _, evecs = _eigh(gram)
    return row_l1(x, evecs, finite)


def randomized_scores(x: torch.Tensor, finite: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """x [B, Nv, D] -> c [B, Nv] float32 from a seeded rank-`rank` range finder (python_ref's algorithm)."""
    num_visual, dim = x.shape[1:]
    k = min(rank, num_visual, dim)
    cols = sketch_cols(num_visual, dim, rank)
    xt = x.transpose(1, 2)
    y = matmul(x, Sketch(seed, dim, cols), finite, mask_a=_MASK_A_ROWS)
    for _ in range(POWER_ITERATIONS):
        z = _orthonormal(matmul(xt, _orthonormal(y), finite, mask_a=_MASK_A_COLS))
        y = matmul(x, z, finite, mask_a=_MASK_A_ROWS)
    basis = _orthonormal(y)                                                       # [B, Nv, l]
    small = matmul(basis.transpose(1, 2), x, finite, mask_b=_MASK_B_ROWS)         # [B, l, D]
    evals, evecs = _eigh(matmul(small, small.transpose(1, 2), finite, lower=True))
    weights = evecs[:, :, cols - k:] * evals[:, None, cols - k:].clamp_min(0.0).sqrt()   # [B, l, k]
    return row_l1(basis, weights, finite)


def info_scores(hidden: torch.Tensor, rank: int = 0, seed: int = 0) -> torch.Tensor:
    """hidden [B, Nv, D] float32/float16/bfloat16/float64 -> c [B, Nv] float32.

    rank = 0: exact, c_i = sum_j |U_ij| S_j; rank > 0: randomized with `seed`. Arguments, the sketch size
    included, are checked by the caller (backend._checked runs the Meta kernel's checks).
    """
    check_device(hidden)
    with device_guard(hidden):
        batch, num_visual, dim = hidden.shape
        if batch * num_visual == 0 or dim == 0:
            return torch.zeros(batch, num_visual, device=hidden.device, dtype=torch.float32)
        finite = finite_rows(hidden)
        return randomized_scores(hidden, finite, rank, seed) if rank > 0 else exact_scores(hidden, finite)
