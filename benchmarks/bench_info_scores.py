"""info_scores: the information contribution score of every visual token, exact and randomized.

    python -m benchmarks.bench_info_scores [--device cuda] [--dtype fp32 bf16 fp16] [--batch 1 8] [--full] [--rank 64]

Two ops (rows "info_scores" and "info_scores_randomized"). Impls: the op (C++ on the CPU, "tokencarve":
float64 Gram matrix + LAPACK eigh; Triton on CUDA, "triton"); python_ref (float64: the thin SVD, the
definition; the same randomized algorithm for rank > 0); authors (exact only: their float32 SVD with
full_matrices=True, one image at a time).

Cost model per image, m = max(Nv, D), n = min(Nv, D), element size e (flop counts for the SVD and the
symmetric eigendecomposition are Golub and Van Loan's):
  bytes (all)     e Nv D + 4 Nv                        X read once, the scores written
  op, exact       n^2 m                                one triangle of the n x n Gram matrix (X X^T, or
                + 9 n^3                                X^T X when Nv > D); eigh with eigenvectors
                + (Nv > D) 2 Nv D^2                    the coordinates X V
  python_ref      6 m n^2 + 20 n^3                     thin SVD (R-SVD, computing U1, S, V)
  authors         4 m^2 n + 22 n^3                     SVD with full U and V (R-SVD): the unused D x D V^T
  randomized      2 Nv D l (2 + 2 q)                   sketch, q power iterations, projection; l = rank + p
                                                       (q, p: python_ref.info_scores POWER_ITERATIONS, OVERSAMPLING)
                + 4 l^2 (Nv (q + 1) + D q) + 2 l^2 D   QRs, the small Gram
                + 9 l^3 + 2 Nv l k                     its eigh, the coordinates (k = rank)
Float64 impls are bounded by the float64 matmul rate, the others by the float32 one.
Skips follow the floor (--max-case-seconds) and the memory they need (half the free memory): on the CPU
the authors' full SVD is out of reach at video scale (a 16384 x 16384 U, 6 TFLOP per image).
"""

import torch

import python_ref
import tokencarve_kernels as tk
from benchmarks import harness
from python_ref.info_scores import OVERSAMPLING, POWER_ITERATIONS, sketch_cols

EXACT, RANDOMIZED = "info_scores", "info_scores_randomized"


def exact_flops(nv: int, d: int) -> float:
    """The op's exact path on one image [nv, d] (Gram of the smaller side + eigh)."""
    m, n = max(nv, d), min(nv, d)
    return n * n * m + 9 * n**3 + (2 * nv * d * d if nv > d else 0)


def thin_svd_flops(nv: int, d: int) -> float:
    m, n = max(nv, d), min(nv, d)
    return 6 * m * n * n + 20 * n**3


def full_svd_flops(nv: int, d: int) -> float:
    m, n = max(nv, d), min(nv, d)
    return 4 * m * m * n + 22 * n**3


def thin_svd_peak(nv: int, d: int, batch: int) -> float:
    """Bytes live at once in python_ref's float64 thin SVD of a batch of [nv, d] images: their copies, the factors."""
    m, n = max(nv, d), min(nv, d)
    return batch * 8 * (3 * nv * d + 2 * m * n)


def full_svd_peak(nv: int, d: int) -> float:
    """Bytes live at once in the authors' float32 full SVD of one [nv, d] image (they score one at a time)."""
    m, n = max(nv, d), min(nv, d)
    return 4 * (2 * nv * d + m * m + n * n)


def randomized_flops(nv: int, d: int, rank: int, oversampling: int = OVERSAMPLING,
                     power_iterations: int = POWER_ITERATIONS) -> float:
    """The randomized path on one image [nv, d] (the op's defaults unless given; the study varies them)."""
    k = min(rank, nv, d)
    cols = sketch_cols(nv, d, rank, oversampling)
    q = power_iterations
    return (2 * nv * d * cols * (2 + 2 * q) + 4 * cols**2 * (nv * (q + 1) + d * q) + 2 * cols**2 * d
            + 9 * cols**3 + 2 * nv * cols * k)


def cases(shape: harness.Shape, batch: int, dtype: torch.dtype, device: torch.device, args) -> list:
    x = harness.hidden(shape, batch, dtype, device)
    nv, d = shape.num_visual, shape.dim
    n = min(nv, d)
    io = batch * (harness.element_size(dtype) * nv * d + 4 * nv)
    threads = 1 if device.type == "cuda" else min(batch, torch.get_num_threads())
    # What is live at once: float64 copies of the images in flight, the Gram or the factors.
    op_peak = threads * 8 * (nv * d + 3 * n * n)
    ref_peak = thin_svd_peak(nv, d, batch)
    out = [
        harness.Case(EXACT, harness.package_impl(EXACT, device), lambda: tk.info_scores(x, check_finite=False), io, batch * exact_flops(nv, d),
                     harness.package_flop_dtype(device), "Gram + eigh", op_peak),
        harness.Case(EXACT, "python_ref", lambda: python_ref.info_scores(x), io, batch * thin_svd_flops(nv, d), "fp64",
                     "float64 thin SVD", ref_peak),
        harness.Case(EXACT, "authors", lambda: python_ref.authors_info_scores(x), io, batch * full_svd_flops(nv, d),
                     "fp32", "float32 SVD, full_matrices=True", full_svd_peak(nv, d)),
    ]
    if args.rank > 0:
        rank = args.rank
        flops = batch * randomized_flops(nv, d, rank)
        out += [
            harness.Case(RANDOMIZED, harness.package_impl(RANDOMIZED, device),
                         lambda: tk.info_scores(x, rank=rank, seed=0, check_finite=False), io, flops,
                         harness.package_flop_dtype(device), f"rank {rank}", op_peak),
            harness.Case(RANDOMIZED, "python_ref", lambda: python_ref.info_scores(x, rank=rank, seed=0), io, flops,
                         "fp64", f"rank {rank}, float64", ref_peak),
        ]
    return out


def check(shape, batch, dtype, outputs) -> list[str]:
    return [line for op in (EXACT, RANDOMIZED) for line in harness.compare_scores(op, shape, batch, dtype, outputs)]


def add_arguments(parser):
    parser.add_argument("--rank", type=int, default=64, help="rank of the randomized rows (0: none)")
    return parser


def main(argv=None) -> harness.Report:
    args = add_arguments(harness.parser(__doc__)).parse_args(argv)
    return harness.sweep(EXACT, args, cases, check)


if __name__ == "__main__":
    main()
