"""GPU timings of the Triton score kernels, and the eigensolver options of the exact information score.

    python -m benchmarks.gpu_scores [--smoke]

Written to run on a lent H100/H200 in one short call (about 2-4 minutes); --smoke runs tiny shapes on
whatever device is there (the CPU interpreter here) to prove the script itself works. Prints tables
and appends rows to benchmarks/out/results.csv (benchmarks/harness.py).

1. last_query_attention, LLaVA-1.5-7B layer shapes (Hq = Hk = 32, d = 128, bf16, 576 visual keys) and a
   GQA model (Hq = 32, Hk = 8), N up to 32k: the Triton kernel against a one-row torch computation
   ([B, Hq, N] logits, softmax, head mean) and the authors' eager N x N route (N <= 4096); GB/s of
   reading K once.
2. info_scores exact, (B, 576, 4096) bf16: the whole op, then its parts: the row-finiteness pass, the
   float64 Gram by the Triton GEMM against cuBLAS DGEMM on a float64 copy, the eigensolver options
   (torch.linalg.eigh float64 with cuSOLVER and with MAGMA, float32, float32 + one Ogita-Aishima
   refinement step in float64), the row-L1 kernel; for each eigensolver, whether the selection at
   T = 128 equals the float64 SVD's on ill-conditioned (decay 7) inputs. The authors' float32 full SVD
   as the baseline.
3. info_scores randomized (ranks 64/128/256, the defaults p and q) against exact at Nv = 576, 2880,
   16384 and D = 4096.
"""

import argparse
import importlib

import torch

import python_ref
import tokencarve_kernels as tk
from benchmarks.harness import Row, append_csv, measure
from tests.inputs import attention_scores, hidden_states, queries_keys


def _ms(fn, device, repeats=20):
    return measure(fn, device, repeats=repeats, warmup=3, max_seconds=20.0)


def _row(op, impl, shape, dtype, stats, device, **kw):
    return Row(op=op, impl=impl, shape=shape, dtype=dtype, median_ms=stats["median_ms"], p20_ms=stats["p20_ms"],
               p80_ms=stats["p80_ms"], **kw).complete(device)


def torch_row_attention(q, k, vis_start, vis_len, scale):
    """The obvious torch route: one [B, Hq, N] row of logits in fp32, softmax, head mean."""
    group = q.shape[1] // k.shape[1]
    logits = torch.einsum("bhgd,bhnd->bhgn", q.float().unflatten(1, (k.shape[1], group)), k.float()) * scale
    return logits.softmax(-1).flatten(1, 2).mean(1)[:, vis_start : vis_start + vis_len]


def bench_attention(device, smoke):
    rows = []
    shapes = [(1, 32, 32, n) for n in (700, 2048, 8192, 32768)] + [(8, 32, 32, 700), (1, 32, 8, 8192)]
    if smoke:
        shapes = [(1, 4, 2, 100)]
    d = 16 if smoke else 128
    vis = min(576, shapes[0][3] - 1) if smoke else 576
    print("\nlast_query_attention (bf16):  B Hq Hk N | triton ms | torch-row ms | eager ms | triton GB/s")
    for batch, hq, hk, n in shapes:
        q, k = (t.to(device) for t in queries_keys(batch, hq, hk, n, d, dtype=torch.bfloat16))
        start = 35 if n > vis + 35 else 0
        args = (q, k, start, vis, d**-0.5)
        k_bytes = k.numel() * k.element_size()
        t_triton = _ms(lambda: torch.ops.tokencarve.last_query_attention(*args), device)
        t_row = _ms(lambda: torch_row_attention(*args), device)
        t_eager = None
        if n <= 4096:
            q_all = torch.randn(batch, hq, n, d, device=device, dtype=torch.bfloat16)
            q_all[:, :, -1] = q
            t_eager = _ms(lambda: python_ref.eager_last_query_attention(q_all, k, start, vis, d**-0.5), device, 5)
        shape = f"B{batch}-Hq{hq}-Hk{hk}-N{n}-d{d}"
        rows.append(_row("last_query_attention", "triton", shape, "bf16", t_triton, device, bytes=k_bytes))
        rows.append(_row("last_query_attention", "torch_row", shape, "bf16", t_row, device, bytes=k_bytes))
        if t_eager:
            rows.append(_row("last_query_attention", "eager_nxn", shape, "bf16", t_eager, device))
        eager = f"{t_eager['median_ms']:.3f}" if t_eager else "-"
        print(f"  {batch} {hq} {hk} {n} | {t_triton['median_ms']:.3f} | {t_row['median_ms']:.3f} | {eager} | "
              f"{k_bytes / t_triton['median_ms'] / 1e6:.0f}")
    return rows


def ogita_aishima_step(a: torch.Tensor, x: torch.Tensor):
    """One refinement step (Ogita & Aishima 2018) of approximate eigenvectors x of symmetric a, in float64:
    -> (eigenvalues, refined eigenvectors). GEMMs only; near-equal eigenvalues get the symmetric update."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    r = eye - x.transpose(-1, -2) @ x
    s = x.transpose(-1, -2) @ a @ x
    lam = s.diagonal(dim1=-2, dim2=-1) / (1 - r.diagonal(dim1=-2, dim2=-1))
    off = s - torch.diag_embed(lam)
    delta = 2 * (torch.linalg.matrix_norm(off) + torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(r))
    gap = lam[..., None, :] - lam[..., :, None]                                   # lam_j - lam_i
    e = torch.where(gap.abs() > delta[..., None, None], (s + r * lam[..., None, :]) / gap, r / 2)
    return lam, x + x @ e


def _scores_from_eig(evals, evecs):
    return (evecs.abs() * evals.clamp_min(0.0).sqrt()[..., None, :]).sum(-1).float()


def bench_exact(device, smoke):
    tis = importlib.import_module("tokencarve_kernels.triton.info_scores")  # the module, not the function
    rows = []
    nv, dim = (40, 64) if smoke else (576, 4096)
    print(f"\ninfo_scores exact, Nv = {nv}, D = {dim}, bf16 input (ms; 'same' = selection at T = 128 equals "
          "the fp64 SVD's on decay-7 inputs, all images)")
    for batch in (1,) if smoke else (1, 8):
        hidden = hidden_states(batch, nv, dim, seed=1, decay=7.0, dtype=torch.bfloat16).to(device)
        attn = attention_scores(batch, nv, seed=1)
        budget = max(1, nv // 5) if smoke else 128
        ref_sel = python_ref.select(attn, python_ref.info_scores_svd(hidden.cpu().double()).float(), budget)
        same = lambda c: bool(torch.equal(python_ref.select(attn, c.cpu(), budget), ref_sel))  # noqa: E731
        shape = f"B{batch}-Nv{nv}-D{dim}"
        op = torch.ops.tokencarve.info_scores
        timings = {
            "op (exact)": _ms(lambda: op(hidden), device),
            "authors fp32 full SVD": _ms(lambda: python_ref.authors_info_scores(hidden), device, 5),
        }
        finite = tis.finite_rows(hidden)
        timings["finite rows"] = _ms(lambda: tis.finite_rows(hidden), device)
        xt = hidden.transpose(1, 2)
        timings["gram triton fp64"] = _ms(
            lambda: tis.matmul(hidden, xt, finite, mask_a=1, mask_b=2, lower=True), device)
        x64 = hidden.double()
        timings["gram cuBLAS fp64 (on an fp64 copy)"] = _ms(lambda: x64 @ x64.transpose(1, 2), device)
        gram = tis.matmul(hidden, xt, finite, mask_a=1, mask_b=2, lower=True)
        gram_full = x64 @ x64.transpose(1, 2)
        evals, evecs = torch.linalg.eigh(gram, UPLO="L")
        timings["row L1"] = _ms(lambda: tis.row_l1(evecs, evals.clamp_min(0).sqrt(), finite), device)
        agree = {"op (exact)": same(op(hidden)), "authors fp32 full SVD": same(python_ref.authors_info_scores(hidden))}
        solvers = {"eigh fp64 (default)": lambda: torch.linalg.eigh(gram, UPLO="L")}
        if device.type == "cuda":
            def magma():
                torch.backends.cuda.preferred_linalg_library("magma")
                try:
                    return torch.linalg.eigh(gram, UPLO="L")
                finally:
                    torch.backends.cuda.preferred_linalg_library("default")
            solvers["eigh fp64 MAGMA"] = magma
        gram32 = gram_full.float()
        solvers["eigh fp32"] = lambda: tuple(t.double() for t in torch.linalg.eigh(gram32))
        solvers["eigh fp32 + 1 refinement (fp64)"] = lambda: ogita_aishima_step(
            gram_full, torch.linalg.eigh(gram32)[1].double())
        for name, solve in solvers.items():
            timings[name] = _ms(solve, device, 10)
            agree[name] = same(_scores_from_eig(*solve()))
        for name, t in timings.items():
            flag = "" if name not in agree else ("same" if agree[name] else "DIFFERENT")
            print(f"  B={batch} {name:>38}: {t['median_ms']:9.3f}  {flag}")
            rows.append(_row("info_scores_exact", name.replace(" ", "_"), shape, "bf16", t, device,
                             note=flag, flop_dtype="fp64"))
    return rows


def bench_randomized(device, smoke):
    rows = []
    dim = 64 if smoke else 4096
    nvs = (40, 100) if smoke else (576, 2880, 16384)
    ranks = (8,) if smoke else (64, 128, 256)
    print(f"\ninfo_scores randomized vs exact, D = {dim}, bf16 (ms)")
    op = torch.ops.tokencarve.info_scores
    for nv in nvs:
        hidden = hidden_states(1, nv, dim, seed=2, dtype=torch.bfloat16).to(device)
        t_exact = _ms(lambda: op(hidden), device, 5)
        cells = [f"exact {t_exact['median_ms']:.3f}"]
        rows.append(_row("info_scores_scale", "exact", f"Nv={nv},D={dim}", "bf16", t_exact, device))
        for rank in ranks:
            t = _ms(lambda: op(hidden, rank, 0), device, 10)
            cells.append(f"rank {rank} {t['median_ms']:.3f}")
            rows.append(_row("info_scores_scale", f"rank{rank}", f"Nv={nv},D={dim}", "bf16", t, device))
        print(f"  Nv={nv}: " + ", ".join(cells))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check that the script runs")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no GPU here: run with --smoke (tiny shapes, Triton interpreter) or on a GPU")
    with tk.use_backend("triton"):  # the Triton kernels on every device (CPU: the interpreter)
        rows = [*bench_attention(device, args.smoke), *bench_exact(device, args.smoke),
                *bench_randomized(device, args.smoke)]
    if not args.smoke:
        append_csv(rows)


if __name__ == "__main__":
    main()
