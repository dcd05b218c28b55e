"""Stage 0: the information contribution score (ICS) of each visual token (SPEC.md, "the two scores").

X = U S V^T (thin SVD of one image's hidden states, [Nv, D]); c_i = sum_j |U_ij| S_j, the L1 norm of
token i's coordinates in the principal basis. Three ways to compute it, all in float64:
  "svd"   the definition (the default);
  "gram"  the eigendecomposition of the smaller Gram matrix (X X^T when Nv <= D, else X^T X and the
          coordinates X V), which is what the kernels do;
  rank>0  a randomized range finder (opt-in, approximate), with the sketch drawn from an explicit seed.
`authors_info_scores` is the authors' own path, a float32 SVD with full matrices, kept as a baseline.

Non-finite input: a token whose hidden state holds NaN or +-Inf gets score NaN (so it ranks last);
the other tokens are scored as if that token's row were zero. No error is raised and nothing syncs.
"""

import numpy as np
import torch

# Randomized path: oversampling columns beyond the rank, and power iterations, chosen by
# benchmarks/study_randomized.py (results: benchmarks/study_randomized.md). With one power iteration the
# path reaches a top-192 overlap of 0.97 in every studied shape where any configuration does (without it,
# it misses three of the four flatter spectra that some configuration reaches), at 1.0-2.0x the flops of
# the cheapest configuration of each shape. At an equal sketch width (l = 144, Nv = 576) summing all l
# coordinates (p = 0) matched summing the top l - 16 (p = 16) within 0.021 of overlap, ahead in 7 of 12
# settings and tied in 2: oversampled columns are better spent as rank. csrc/checks.h holds the
# same two numbers.
OVERSAMPLING = 0
POWER_ITERATIONS = 1


def _finite_rows(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X in float64 with non-finite rows zeroed, finite-row mask [B, Nv])."""
    x = hidden.double()
    finite = torch.isfinite(x).all(dim=-1)
    return torch.where(finite[..., None], x, 0.0), finite


def _mark_nonfinite(scores: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    return torch.where(finite, scores, float("nan"))


def info_scores_svd(hidden: torch.Tensor) -> torch.Tensor:
    """hidden [B, Nv, D] -> c [B, Nv] float64, by a float64 thin SVD (the definition)."""
    x, finite = _finite_rows(hidden)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    return _mark_nonfinite((u.abs() * s[:, None, :]).sum(-1), finite)


def info_scores_gram(hidden: torch.Tensor) -> torch.Tensor:
    """hidden [B, Nv, D] -> c [B, Nv] float64, by float64 Gram matrix + eigh on the smaller side.

    Nv <= D: G = X X^T = Q L Q^T, c_i = sum_j |Q_ij| sqrt(max(L_j, 0)).
    Nv >  D: G = X^T X = V L V^T, c_i = sum_j |(X V)_ij|  (cost linear in Nv).
    """
    x, finite = _finite_rows(hidden)
    num_visual, dim = x.shape[-2:]
    if num_visual <= dim:
        evals, evecs = torch.linalg.eigh(x @ x.transpose(1, 2))
        c = (evecs.abs() * evals.clamp_min(0.0).sqrt()[:, None, :]).sum(-1)
    else:
        _, evecs = torch.linalg.eigh(x.transpose(1, 2) @ x)
        c = (x @ evecs).abs().sum(-1)
    return _mark_nonfinite(c, finite)


def _philox4x32(counter: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """First two 32-bit words of Philox4x32-10 for counters (c0=counter, c1=c2=c3=0), key=seed.

    Bit-identical to Triton's `tl.randint4x(seed, offset)` with an int32 offset.
    """
    mask = np.uint64(0xFFFFFFFF)
    c0 = counter.astype(np.uint64) & mask
    c1 = np.zeros_like(c0)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0 = np.uint64(seed & 0xFFFFFFFF)
    k1 = np.uint64((seed >> 32) & 0xFFFFFFFF)
    round_a, round_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    key_a, key_b = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    for _ in range(10):
        prod_b = round_b * c2  # < 2^64: exact in uint64
        prod_a = round_a * c0
        c0, c1, c2, c3 = (
            (prod_b >> np.uint64(32)) ^ c1 ^ k0,
            prod_b & mask,
            (prod_a >> np.uint64(32)) ^ c3 ^ k1,
            prod_a & mask,
        )
        k0 = (k0 + key_a) & mask
        k1 = (k1 + key_b) & mask
    return c0.astype(np.uint32), c1.astype(np.uint32)


def gaussian_sketch(seed: int, rows: int, cols: int) -> torch.Tensor:
    """Omega [rows, cols] float32, standard normal, Omega[i, j] a function of (seed, offset = i * cols + j) only,
    so a kernel regenerates any entry without storing Omega (the Triton kernel's `_gaussian`, csrc/philox.h).

    w0, w1 = the first two words of Philox4x32-10 (counter = offset, key = seed; integers, exact everywhere);
    u1 = (w0 + 1) 2^-32 in (0, 1] and u2 = w1 2^-32 in [0, 1), both exact in float64;
    z = sqrt(-2 ln u1) cos(2 pi u2) in float64 (Box-Muller), rounded once to float32.
    Bit-identical across implementations except where libraries' float64 log/cos (not correctly rounded: numpy
    here, libdevice on NVIDIA, glibc in C++) differ in the last bits AND the float64 value lies within ~1e-16
    relative of a float32 rounding boundary, a few entries in 10^9: the best a sketch built on transcendental
    functions can do. (A float32 Box-Muller, as Triton's tl.randn, differs between devices in many entries.)
    """
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    offsets = np.arange(rows * cols, dtype=np.int64)
    w0, w1 = _philox4x32(offsets, seed)
    u1 = (w0.astype(np.float64) + 1.0) * 2.0**-32
    u2 = w1.astype(np.float64) * 2.0**-32
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return torch.from_numpy(z.astype(np.float32).reshape(rows, cols))


def sketch_cols(num_visual: int, dim: int, rank: int, oversampling: int = OVERSAMPLING) -> int:
    """Width l of the randomized path's sketch: min(k + oversampling, m), k = min(rank, m), m = min(Nv, D)."""
    m = min(num_visual, dim)
    return min(min(rank, m) + oversampling, m)


def randomized_coordinates(
    hidden: torch.Tensor,
    rank: int,
    seed: int = 0,
    *,
    oversampling: int = OVERSAMPLING,
    power_iterations: int = POWER_ITERATIONS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, Nv, D] -> (coords [B, Nv, k] float64, finite [B, Nv]): each token's coordinates in the
    top k = min(rank, m) directions of a randomized range finder, m = min(Nv, D).

    Range finder Y = X Omega, Omega = gaussian_sketch(seed, D, l), l = min(k + oversampling, m);
    `power_iterations` rounds of Y <- X (X^T Y) with re-orthonormalisation; an orthonormal basis Qy of Y;
    the eigendecomposition W L W^T of (Qy^T X)(Qy^T X)^T; coordinates Qy W_k sqrt(L_k) (ascending L).
    """
    x, finite = _finite_rows(hidden)
    num_visual, dim = x.shape[-2:]
    k = min(rank, num_visual, dim)
    cols = sketch_cols(num_visual, dim, rank, oversampling)
    omega = gaussian_sketch(seed, dim, cols).to(device=x.device, dtype=torch.float64)
    y = x @ omega
    for _ in range(power_iterations):
        z = torch.linalg.qr(x.transpose(1, 2) @ torch.linalg.qr(y).Q).Q
        y = x @ z
    basis = torch.linalg.qr(y).Q                                       # [B, Nv, l]
    small = basis.transpose(1, 2) @ x                                  # [B, l, D]
    evals, evecs = torch.linalg.eigh(small @ small.transpose(1, 2))    # ascending
    evals, evecs = evals[:, cols - k:], evecs[:, :, cols - k:]
    return (basis @ evecs) * evals.clamp_min(0.0).sqrt()[:, None, :], finite


def info_scores_randomized(hidden: torch.Tensor, rank: int, seed: int = 0) -> torch.Tensor:
    """hidden [B, Nv, D] -> c [B, Nv] float64: the L1 norm of each token's `randomized_coordinates`.

    Exact (to rounding) once rank reaches min(Nv, D). Same seed, same scores on every run. The algorithm's
    constants (OVERSAMPLING, POWER_ITERATIONS) come from benchmarks/study_randomized.py.
    """
    coords, finite = randomized_coordinates(hidden, rank, seed)
    return _mark_nonfinite(coords.abs().sum(-1), finite)


def info_scores(hidden: torch.Tensor, rank: int = 0, seed: int = 0, method: str = "svd") -> torch.Tensor:
    """hidden [B, Nv, D] -> c [B, Nv] float32 (the op's output dtype: selections rank these values).

    rank == 0: exact, by `method` ("svd", the definition and the default, or "gram");
    rank > 0: randomized, with `seed`.
    """
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if rank > 0:
        return info_scores_randomized(hidden, rank, seed).float()
    if method == "svd":
        return info_scores_svd(hidden).float()
    if method == "gram":
        return info_scores_gram(hidden).float()
    raise ValueError(f"method must be 'gram' or 'svd', got {method!r}")


def authors_info_scores(hidden: torch.Tensor) -> torch.Tensor:
    """The authors' scoring: a float32 SVD with full_matrices=True (an unused D x D V^T), per image.

    hidden [B, Nv, D] -> c [B, Nv] float32. A baseline for benchmarks, not a reference: in float32
    its selections drift from the float64 definition on ill-conditioned inputs.
    """
    scores = []
    for image in hidden.float().unbind(0):  # the authors run batch size 1
        u, s, _ = torch.linalg.svd(image, full_matrices=True)
        scores.append((u[:, : s.shape[0]].abs() * s).sum(-1))
    return torch.stack(scores) if scores else hidden.new_zeros(hidden.shape[:2], dtype=torch.float32)
