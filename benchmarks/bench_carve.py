"""carve end to end (information score, select, merge), its baselines, and the select + merge part alone.

    python -m benchmarks.bench_carve [--device cuda] [--dtype fp32 bf16 fp16] [--batch 1 8] [--full]

Rows "carve", impls:
  tokencarve       the op (exact scores, fused ranks, paper-exact mean merge)
  python_ref       python_ref.carve: the float64 reference, scoring by the float64 thin SVD
  authors_scoring  the authors' scoring step alone: float32 SVD with full_matrices=True, one image at a time
  authors          the authors' scoring followed by python_ref's select and merge (their selection, emulated)
  fastv            the op with attn_weight = 1: attention only (FastV-like), no information score, same budget
Rows "select_merge", impls tokencarve (the two ops) and python_ref (the two reference functions), on the
factory's score vectors (bench_select.scores).

After each point it prints the ratios of issue 4 side by side (carve against python_ref and against the
authors' scoring, select + merge against its reference; the targets at B = 8 on LLaVA-1.5) and checks that
the op keeps exactly the tokens python_ref keeps, that is, the selections of a float64 SVD: a difference
stops the run.

Cost model per image (bench_info_scores and bench_merge give the parts): bytes = e Nv D + e T D + 4 Nv + 8 T
(X and the attention read once, the carved states and keep_idx written); flops = the scoring of the impl
(Gram + eigh; thin SVD; full SVD; none for fastv) + the merge's. Bounds: float64 matmul rate for the
float64 impls, float32 for the authors.
"""

import torch

import python_ref
import tokencarve_kernels as tk
from benchmarks import bench_info_scores, bench_merge, harness
from benchmarks.bench_select import scores
from tests.inputs import rel_err

OP, PARTS = "carve", "select_merge"
# Issue 4 (CPU, B = 8, Nv = 576, D = 4096, T = 128, exact scores): speed-up targets of the op over each comparator.
TARGETS = {(OP, "python_ref"): 3.0, (OP, "authors_scoring"): 8.0, (PARTS, "python_ref"): 5.0}
TARGET_POINT = ("llava15", 8)


def authors_carve(x: torch.Tensor, attn: torch.Tensor, budget: int, ops=python_ref
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenCarve with the authors' scores (float32 full SVD per image), then `ops`'s select and merge: python_ref,
    or torch.ops.tokencarve where only the scoring should differ from the package's carve (bench_hf).

    x [B, Nv, D], attn [B, Nv] -> (carved [B, T, D], keep_idx [B, T])."""
    order = ops.select(attn, python_ref.authors_info_scores(x), budget)
    carved, keep_idx, _ = ops.merge(x, order, budget)
    return carved, keep_idx


def cases(shape: harness.Shape, batch: int, dtype: torch.dtype, device: torch.device, args) -> list:
    x = harness.hidden(shape, batch, dtype, device)
    attn = harness.attn(shape, batch, device)
    nv, d, t = shape.num_visual, shape.dim, shape.budget
    e = harness.element_size(dtype)
    io = batch * (e * nv * d + e * t * d + 4 * nv + 8 * t)
    merge_bytes, merge_flops = bench_merge.cost(shape, batch, dtype)
    ref_peak = bench_info_scores.thin_svd_peak(nv, d, batch)
    authors_peak = bench_info_scores.full_svd_peak(nv, d) + bench_merge.ref_peak(shape, batch)
    package = harness.package_impl(OP, device)
    part_attn, part_info = scores(shape, batch, device)
    return [
        harness.Case(OP, package, lambda: tk.carve(x, attn, t, check_finite=False), io,
                     batch * bench_info_scores.exact_flops(nv, d) + merge_flops, harness.package_flop_dtype(device)),
        harness.Case(OP, "python_ref", lambda: python_ref.carve(x, attn, t), io,
                     batch * bench_info_scores.thin_svd_flops(nv, d) + merge_flops, "fp64", "float64 thin SVD", ref_peak),
        harness.Case(OP, "authors_scoring", lambda: python_ref.authors_info_scores(x), batch * (e * nv * d + 4 * nv),
                     batch * bench_info_scores.full_svd_flops(nv, d), "fp32", "scoring only", authors_peak),
        harness.Case(OP, "authors", lambda: authors_carve(x, attn, t), io,
                     batch * bench_info_scores.full_svd_flops(nv, d) + merge_flops, "fp32",
                     "their scoring + python_ref select/merge", authors_peak),
        harness.Case(OP, "fastv", lambda: tk.carve(x, attn, t, attn_weight=1.0, check_finite=False),
                     merge_bytes, merge_flops, "fp64", "attention only"),
        harness.Case(PARTS, package,
                     lambda: tk.merge(x, tk.select(part_attn, part_info, t, check_finite=False), t, check_finite=False),
                     merge_bytes, merge_flops, "fp64"),
        harness.Case(PARTS, "python_ref", lambda: python_ref.merge(x, python_ref.select(part_attn, part_info, t), t),
                     merge_bytes, merge_flops, "fp64", peak_bytes=bench_merge.ref_peak(shape, batch)),
    ]


def _package(keys) -> str | None:
    """The package's impl label among keys (op, impl): "tokencarve", or "triton" where the op is Triton."""
    return next((impl for _, impl in keys if impl in harness.PACKAGE_IMPLS), None)


def ratios(shape, batch, dtype, rows) -> list[str]:
    """The issue-4 speed-ups of the op over each comparator, from rows timed side by side."""
    package = _package(rows)
    ms = {key: row["median_ms"] for key, row in rows.items()}
    at_target = (shape.name, batch) == TARGET_POINT
    lines = [f"carve at {harness.label(shape, batch)} T{shape.budget} {dtype}, measured side by side in one run:"]
    for (op, impl), text in (((OP, "python_ref"), "carve vs python_ref.carve"),
                             ((OP, "authors_scoring"), "carve vs the authors' scoring (fp32 full SVD)"),
                             ((OP, "authors"), "carve vs the authors' scoring + select/merge"),
                             ((PARTS, "python_ref"), "select+merge vs python_ref select+merge")):
        ours = ms.get((op, package))
        if ours is None or (op, impl) not in ms:
            continue
        ratio = ms[(op, impl)] / ours
        target = TARGETS.get((op, impl)) if at_target else None
        verdict = f"   target >= {target:g}x (issue 4): {'met' if ratio >= target else 'NOT met'}" if target else ""
        lines.append(f"  {text:<48} {ratio:6.1f}x  ({ms[(op, impl)]:.1f} / {ours:.1f} ms){verdict}")
    if (OP, "fastv") in ms and (OP, package) in ms:
        share = ms[(OP, "fastv")] / ms[(OP, package)]
        lines.append(f"  {'attention-only carve (FastV-like) / carve':<48} {share:6.2f}   "
                     f"(the information score's share of carve: {1 - share:.0%})")
    return lines


def check(shape, batch, dtype, outputs) -> list[str]:
    """The op must keep exactly the tokens python_ref.carve keeps (float64 SVD scores): otherwise this raises."""
    where = f"{harness.label(shape, batch)} T{shape.budget} {dtype}"
    package = _package(outputs)
    lines = []
    ref, ours = outputs.get((OP, "python_ref")), outputs.get((OP, package))
    if ours is not None and ref is None:
        lines.append("  selections: not checked (python_ref.carve not run at this point)")
    elif ours is not None:
        ref_carved, ref_keep = (v.cpu() for v in ref)
        carved, keep = (v.cpu() for v in ours)
        same = (keep == ref_keep).all(dim=1)
        if not bool(same.all()):
            raise AssertionError(f"carve at {where}: keep_idx differs from python_ref (float64 SVD) in images "
                                 f"{(~same).nonzero().flatten().tolist()}")
        err = rel_err(carved, ref_carved)
        if not err <= harness.state_tolerance(dtype):
            raise AssertionError(f"carve at {where}: carved states differ from python_ref's, rel err {err:.1e}")
        lines.append(f"  selections: keep_idx identical to python_ref.carve (float64 thin SVD scores) in "
                     f"{batch}/{batch} images; carved states rel err {err:.1e}")
        if (OP, "authors") in outputs:
            authors_same = int((outputs[(OP, "authors")][1].cpu() == ref_keep).all(dim=1).sum())
            lines.append(f"  the authors' float32 full-SVD scoring keeps the same tokens in {authors_same}/{batch} images")
    parts, parts_ref = outputs.get((PARTS, package)), outputs.get((PARTS, "python_ref"))
    if parts is not None and parts_ref is not None:
        if not torch.equal(parts[1].cpu(), parts_ref[1].cpu()):
            raise AssertionError(f"select+merge at {where}: keep_idx differs from python_ref")
        lines.append("  select+merge: keep_idx identical to python_ref")
    return lines


def main(argv=None) -> harness.Report:
    args = harness.parser(__doc__).parse_args(argv)
    return harness.sweep(OP, args, cases, check, ratios)


if __name__ == "__main__":
    main()
