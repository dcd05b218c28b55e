"""Which eigensolver should the exact information score use? Its parts timed, and each option's selection checked.

    python -m benchmarks.study_eigensolvers [--device cpu|cuda] [--batch 1 8] [--nv 576] [--dim 4096]
                                            [--dtype bf16] [--decay 7] [--budget 128] [--threads 1]
    python -m benchmarks.study_eigensolvers --smoke          # seconds: B = 2, Nv = 40, D = 64, T = 8

The exact score of an image X [Nv, D] takes three steps: the float64 Gram matrix of the smaller side (G = X X^T,
or X^T X when Nv > D), its eigendecomposition G = Q L Q^T, and row L1 norms (c_i = sum_j |Q_ij| sqrt(L_j), or
sum_j |(X V)_ij| when Nv > D). The package runs all three in float64: a Gram matrix squares the condition number.
On hidden states from tests/inputs.hidden_states with a steep spectrum (--decay 7: singular values spanning 10^-7,
so the Gram's eigenvalues span 10^-14, beyond float32's reach), it times side by side (harness.measure_many):

  scores/op            the package's op whole (CPU: C++ Gram + LAPACK eigh; CUDA: the Triton kernels + cuSOLVER)
  scores/authors       the authors' float32 SVD with full_matrices=True, one image at a time: the baseline
  finite/triton        the op's first pass on CUDA: which tokens are finite
  gram/triton_fp64     the op's Triton GEMM: reads the input dtype, upcasts in registers, lower triangle only
  gram/torch_fp64      torch's matmul on a float64 copy of X (cuBLAS, or the CPU's BLAS; the copy is timed)
  eigh/fp64_<library>  torch.linalg.eigh in float64: cusolver and magma on CUDA, lapack on the CPU
  eigh/fp32            torch.linalg.eigh of the Gram rounded to float32
  eigh/fp32_refined    the same, then one Ogita-Aishima refinement step in float64 (GEMMs only)
  row_l1/triton        the op's row-L1 kernel
  row_l1/torch         the same sums by torch ops (float64)

and reports, for the op, the authors and each eigensolver (its eigenpairs scored by row_l1/torch, rounded to
float32 as the op returns them), in how many images the selection at T = --budget (python_ref.select, fused
ranks) is identical to the one the float64 thin SVD's scores give ("same"), and the smallest share of an image's
K1 selected tokens that both selections hold ("overlap": 1 where only their order, and so the merge, differs).
Every eigensolver starts from the same float64 Gram (gram/torch_fp64's). Triton parts run on CUDA, and on the CPU only under the Triton interpreter
(TRITON_INTERPRET=1 set before the import, as the tests do), where their times mean nothing. Rows are appended
to benchmarks/out/results.csv (op "info_scores_parts"); a table is printed.

Cost model per image, n = min(Nv, D), m = max(Nv, D), element size e (eigh: Golub and Van Loan's 9 n^3 with
vectors; the refinement step adds 8 n^3 of float64 GEMMs):
  scores   bytes e Nv D + 4 Nv; flops: the op's as bench_info_scores (float64), the authors' full SVD (float32)
  finite   bytes e Nv D + Nv
  gram     bytes e Nv D + 8 n^2; flops n^2 m (one triangle)
  eigh     bytes 8 (2 n^2 + n); flops 9 n^3 (+ 8 n^3 refined)
  row_l1   Nv <= D: bytes 8 (n^2 + n) + 4 Nv, flops 2 n^2; Nv > D: bytes e Nv D + 8 D^2 + 4 Nv, flops 2 Nv D^2
"""

import contextlib
import importlib

import torch

import python_ref
import tokencarve_kernels  # noqa: F401  (registers the ops)
from benchmarks import harness
from benchmarks.bench_info_scores import exact_flops, full_svd_flops
from tests.inputs import attention_scores, hidden_states

OP = "info_scores_parts"
EXTRA_COLUMNS = ("same", "same_images", "images", "overlap")
SMOKE = dict(batch=[2], nv=40, dim=64, budget=8, repeats=3, max_seconds=0.05)


def ogita_aishima_step(a: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One refinement step (Ogita and Aishima, 2018) of approximate eigenvectors x [B, n, n] of the symmetric
    a [B, n, n], in a's dtype -> (eigenvalues [B, n], refined eigenvectors [B, n, n]). GEMMs only; eigenvalues
    closer than the step's error bound delta get the symmetric update r / 2 instead of a division by their gap."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    r = eye - x.transpose(-1, -2) @ x
    s = x.transpose(-1, -2) @ a @ x
    lam = s.diagonal(dim1=-2, dim2=-1) / (1 - r.diagonal(dim1=-2, dim2=-1))
    off = s - torch.diag_embed(lam)
    # Frobenius norms bound the spectral norms of the paper from above: delta can only be more cautious.
    delta = 2 * (torch.linalg.matrix_norm(off) + torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(r))
    gap = lam[..., None, :] - lam[..., :, None]                                   # gap[i, j] = lam_j - lam_i
    e = torch.where(gap.abs() > delta[..., None, None], (s + r * lam[..., None, :]) / gap, r / 2)
    return lam, x + x @ e


def row_l1_torch(x64: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor) -> torch.Tensor:
    """Scores [B, Nv] float64 from the eigenpairs of the smaller Gram of x64 [B, Nv, D] (float64)."""
    if x64.shape[1] <= x64.shape[2]:
        return (evecs.abs() * evals.clamp_min(0.0).sqrt()[:, None, :]).sum(-1)
    return (x64 @ evecs).abs().sum(-1)


def same_selection(scores: torch.Tensor, attn: torch.Tensor, budget: int, reference: torch.Tensor
                   ) -> tuple[int, float]:
    """(in how many images the selection from scores [B, Nv], rounded to float32 as the op returns them, is identical
    to reference [B, K1], python_ref.select's order; the smallest share of an image's K1 tokens both select)."""
    order = python_ref.select(attn, scores.float(), budget)
    k1 = order.shape[1]
    overlap = min(len(set(a) & set(b)) / k1 for a, b in zip(order.tolist(), reference.tolist())) if k1 else 1.0
    return int((order == reference).all(dim=1).sum()), overlap


@contextlib.contextmanager
def linalg_library(name: str):
    """torch.linalg on CUDA through `name` ("cusolver", "magma") inside the block."""
    previous = torch.backends.cuda.preferred_linalg_library()
    torch.backends.cuda.preferred_linalg_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_linalg_library(previous)


def on_library(name: str, fn):
    def call():
        with linalg_library(name):
            return fn()

    return call


def triton_module(device: torch.device):
    """(tokencarve_kernels.triton.info_scores, None), or (None, why its kernels cannot run here)."""
    try:
        module = importlib.import_module("tokencarve_kernels.triton.info_scores")
    except ImportError as exc:
        return None, f"triton does not import ({exc})"
    if device.type != "cuda" and not module.INTERPRET:
        return None, "Triton runs on CUDA tensors, or on the CPU under TRITON_INTERPRET=1 (set before the import)"
    return module, None


def gram_torch(x: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of the smaller side of x [B, Nv, D], in float64 by torch: [B, n, n]."""
    y = x.double()
    return y.transpose(1, 2) @ y if y.shape[1] > y.shape[2] else y @ y.transpose(1, 2)


def parts(x: torch.Tensor, device: torch.device) -> tuple[list[dict], list[str]]:
    """The timed parts for hidden x [B, Nv, D] on device: dicts {name, fn, bytes, flops, flop_dtype, eig, optional}
    (eig: fn returns eigenpairs to score, else scores or an intermediate; optional: fn may be unavailable in this
    build), and the parts left out, with the reason."""
    batch, nv, d = x.shape
    n, m, e = min(nv, d), max(nv, d), x.element_size()
    tall = nv > d
    x64 = x.double()
    gram = gram_torch(x64)
    gram32 = gram.float()
    evals, evecs = torch.linalg.eigh(gram)
    io = batch * (e * nv * d + 4 * nv)
    eigh_cost = dict(bytes=batch * 8 * (2 * n * n + n), flops=batch * 9 * n**3)
    row_l1_cost = (dict(bytes=batch * (e * nv * d + 8 * d * d + 4 * nv), flops=batch * 2 * nv * d * d) if tall
                   else dict(bytes=batch * (8 * (n * n + n) + 4 * nv), flops=batch * 2 * n * n))
    gram_cost = dict(bytes=batch * (e * nv * d + 8 * n * n), flops=batch * n * n * m)
    out = [
        dict(name=f"scores/op_{harness.package_impl('info_scores', device)}",
             fn=lambda: torch.ops.tokencarve.info_scores(x), bytes=io, flops=batch * exact_flops(nv, d),
             flop_dtype="fp64"),
        dict(name="scores/authors", fn=lambda: python_ref.authors_info_scores(x), bytes=io,
             flops=batch * full_svd_flops(nv, d), flop_dtype="fp32"),
        dict(name="gram/torch_fp64", fn=lambda: gram_torch(x), flop_dtype="fp64", **gram_cost),
    ]
    if device.type == "cuda":
        # MAGMA may be missing from a build: it is tried once before timing (optional).
        out += [dict(name=f"eigh/fp64_{lib}", fn=on_library(lib, lambda: torch.linalg.eigh(gram)), eig=True,
                     optional=lib == "magma", flop_dtype="fp64", **eigh_cost) for lib in ("cusolver", "magma")]
    else:
        out.append(dict(name="eigh/fp64_lapack", fn=lambda: torch.linalg.eigh(gram), eig=True, flop_dtype="fp64",
                        **eigh_cost))
    out += [
        dict(name="eigh/fp32", fn=lambda: tuple(t.double() for t in torch.linalg.eigh(gram32)), eig=True,
             flop_dtype="fp32", **eigh_cost),
        dict(name="eigh/fp32_refined", fn=lambda: ogita_aishima_step(gram, torch.linalg.eigh(gram32)[1].double()),
             eig=True, flop_dtype="fp64", bytes=eigh_cost["bytes"], flops=batch * 17 * n**3),
        dict(name="row_l1/torch", fn=lambda: row_l1_torch(x64, evals, evecs), flop_dtype="fp64", **row_l1_cost),
    ]
    tis, reason = triton_module(device)
    if tis is None:
        return out, [f"finite, gram and row_l1 by Triton: {reason}"]
    finite = tis.finite_rows(x)
    xt = x.transpose(1, 2)
    # As tokencarve_kernels.triton.info_scores.exact_scores calls them: the masks name the token axis of each operand.
    if tall:
        gram_args = (xt, x, finite), dict(mask_a=tis._MASK_A_COLS, mask_b=tis._MASK_B_ROWS, lower=True)
        row_l1_args = (x, evecs, finite)
    else:
        gram_args = (x, xt, finite), dict(mask_a=tis._MASK_A_ROWS, mask_b=tis._MASK_B_COLS, lower=True)
        row_l1_args = (evecs, evals.clamp_min(0.0).sqrt(), finite)
    out += [
        dict(name="finite/triton", fn=lambda: tis.finite_rows(x), bytes=batch * (e * nv * d + nv), flops=0.0,
             flop_dtype="fp64"),
        dict(name="gram/triton_fp64", fn=lambda: tis.matmul(*gram_args[0], **gram_args[1]), flop_dtype="fp64",
             **gram_cost),
        dict(name="row_l1/triton", fn=lambda: tis.row_l1(*row_l1_args), flop_dtype="fp64", **row_l1_cost),
    ]
    return out, []


def study(args, batch: int) -> list[dict]:
    """One batch size: time every part side by side, check the selections; the rows, completed."""
    device = torch.device(args.device)
    x = hidden_states(batch, args.nv, args.dim, seed=1, decay=args.decay, dtype=harness.DTYPES[args.dtype]).to(device)
    attn = attention_scores(batch, args.nv, seed=1).to(device)
    x64 = x.double()
    reference = python_ref.select(attn, python_ref.info_scores_svd(x).float(), args.budget)
    todo, skipped = parts(x, device)
    runnable = []
    for part in todo:
        try:
            if part.get("optional"):
                part["fn"]()
        except RuntimeError as exc:
            skipped.append(f"{part['name']}: {str(exc).splitlines()[0][:120]}")
        else:
            runnable.append(part)
    stats, outputs = harness.measure_many([p["fn"] for p in runnable], device, repeats=args.repeats,
                                          max_seconds=args.max_seconds)
    shape = f"B{batch} Nv{args.nv} D{args.dim} decay{args.decay:g}"
    interpreted = device.type == "cpu"   # Triton parts exist on the CPU only under the interpreter
    rows = []
    for part, stat, out in zip(runnable, stats, outputs):
        same = overlap = None
        if part.get("eig"):
            same, overlap = same_selection(row_l1_torch(x64, *out), attn, args.budget, reference)
        elif part["name"].startswith("scores/"):
            same, overlap = same_selection(out, attn, args.budget, reference)
        note = "" if same is None else f"same selection as the fp64 SVD in {same}/{batch} images, overlap {overlap:.3f}"
        if interpreted and "triton" in part["name"]:
            note = "Triton interpreter: the time means nothing"
        row = harness.Row.from_stats(OP, part["name"], shape, args.dtype, stat, bytes=part["bytes"],
                                     flops=part["flops"], flop_dtype=part["flop_dtype"], note=note).complete(device)
        rows.append(dict(row, same=f"{same}/{batch}" if same is not None else "", same_images=same, images=batch,
                         overlap=overlap))
    print(f"\n{shape} {args.dtype}, T = {args.budget}: the parts of the exact score")
    harness.print_table(rows, ["impl", "median_ms", "p20_ms", "p80_ms", "gbps", "tflops", "ratio_to_floor", "same",
                               "overlap"])
    if interpreted and any("triton" in r["impl"] for r in rows):
        print("  (the Triton parts ran in the interpreter: their times mean nothing)")
    for line in skipped:
        print(f"  not timed: {line}")
    return rows


def main(argv=None) -> list[dict]:
    """Returns every row: harness.Row.complete's columns, plus EXTRA_COLUMNS (in the CSV, the note says them)."""
    parser = harness.common_arguments(harness.argument_parser(__doc__), repeats=10, max_seconds=10.0)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--nv", type=int, default=576)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--dtype", default="bf16", choices=list(harness.DTYPES))
    parser.add_argument("--decay", type=float, default=7.0, help="the spectrum spans 10^-decay")
    parser.add_argument("--budget", type=int, default=128, help="T: the selection checked is python_ref.select's at T")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (" + ", ".join(
        f"{k} {v}" for k, v in SMOKE.items()) + "): checks that the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    rows = []
    with harness.cpu_threads(args.threads):
        for batch in args.batch:
            rows += study(args, batch)
    if not args.no_csv:
        harness.append_csv([{k: v for k, v in r.items() if k not in EXTRA_COLUMNS} for r in rows], args.csv)
    return rows


if __name__ == "__main__":
    main()
