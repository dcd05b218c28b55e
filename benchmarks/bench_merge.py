"""merge: stage II (cosine matching of the r weakest survivors to the strongest, the merges) and compaction.

    python -m benchmarks.bench_merge [--device cuda] [--dtype fp32 bf16 fp16] [--batch 1 8] [--full]

Impls: the op ("tokencarve": C++ on the CPU, the CUDA kernel on CUDA) and python_ref. The order comes from
python_ref.select on the factory's scores (bench_select.scores); the merge's cost does not depend on which
tokens it names.

Cost model per image, with T the budget, K1 = 1.5 T survivors, nA = K1 // 2 destinations, nB = K1 - nA
sources, r = K1 - T merges, element size e:
  bytes = e K1 D + e T D + 8 (K1 + T) + 4 T     the survivors read once, the carved states written; order in,
                                                keep_idx and sizes out
  flops = 2 nA nB D + 3 K1 D + 2 r D            the cosines, the row norms and scaling, the merged sums
bounded by the float64 matmul rate (the spec's cosines are float64 dot products).
"""

import torch

import python_ref
import tokencarve_kernels as tk
from benchmarks import harness
from benchmarks.bench_select import scores
from tests.inputs import rel_err

OP = "merge"


def cost(shape: harness.Shape, batch: int, dtype: torch.dtype) -> tuple[float, float]:
    """(bytes, flops) of stage II + compaction for the batch."""
    t, k1, n_a, r = python_ref.budget_split(shape.num_visual, shape.budget)
    d, e = shape.dim, harness.element_size(dtype)
    return (batch * (e * k1 * d + e * t * d + 8 * (k1 + t) + 4 * t),
            batch * (2 * n_a * (k1 - n_a) * d + 3 * k1 * d + 2 * r * d))


def ref_peak(shape: harness.Shape, batch: int) -> float:
    """Bytes python_ref.merge holds at once for the batch: float64 copies of the states."""
    return batch * 8 * 3 * shape.num_visual * shape.dim


def cases(shape: harness.Shape, batch: int, dtype: torch.dtype, device: torch.device, args) -> list:
    x = harness.hidden(shape, batch, dtype, device)
    order = python_ref.select(*scores(shape, batch, device), shape.budget)
    t = shape.budget
    io, flops = cost(shape, batch, dtype)
    return [
        harness.Case(OP, harness.package_impl(OP, device), lambda: tk.merge(x, order, t, check_finite=False), io, flops,
                     "fp64"),
        harness.Case(OP, "python_ref", lambda: python_ref.merge(x, order, t), io, flops, "fp64",
                     peak_bytes=ref_peak(shape, batch)),
    ]


def check(shape, batch, dtype, outputs) -> list[str]:
    """keep_idx must be identical to python_ref's; the carved states are compared by relative error."""
    ref = outputs.get((OP, "python_ref"))
    if ref is None:
        return []
    errs = []
    for (_, impl), (carved, keep_idx, _) in outputs.items():
        if not torch.equal(keep_idx.cpu(), ref[1].cpu()):
            raise AssertionError(f"{OP} {impl} at {harness.label(shape, batch)} {dtype}: keep_idx differs from python_ref")
        if impl != "python_ref":
            err = rel_err(carved, ref[0])
            if not err <= harness.state_tolerance(dtype):
                raise AssertionError(f"{OP} {impl} at {harness.label(shape, batch)} {dtype}: carved rel err {err:.1e}")
            errs.append(f"{impl} {err:.1e}")
    return [f"{OP} {harness.label(shape, batch)} {dtype}: keep_idx identical to python_ref; carved rel err {', '.join(errs)}"]


def main(argv=None) -> harness.Report:
    args = harness.parser(__doc__).parse_args(argv)
    return harness.sweep(OP, args, cases, check)


if __name__ == "__main__":
    main()
