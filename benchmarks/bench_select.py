"""select: rank fusion and stage I (the K1 = 1.5 T survivors, by descending fused score).

    python -m benchmarks.bench_select [--device cuda] [--batch 1 8] [--full]

Impls: the op ("tokencarve": C++ on the CPU, the CUDA kernel on CUDA) and python_ref. The inputs are two
float32 score vectors [B, Nv] from the input factory (select reads the float32 outputs of the score ops
whatever the model's dtype, so it is measured at fp32 only, and its cost does not depend on the values).

Cost model per image: bytes = 2 * 4 Nv (both scores read once) + 8 K1 (the order written); no flops are
counted (three sorts of Nv keys and integer arithmetic), so the floor is the memory traffic alone.
"""

import torch

import python_ref
import tokencarve_kernels as tk
from benchmarks import harness

OP = "select"


def scores(shape: harness.Shape, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """attn, info [B, Nv] float32: two independent peaked score vectors (the info one stands in for
    info_scores, whose values select reads only through their ranks)."""
    return harness.attn(shape, batch, device, seed=0), harness.attn(shape, batch, device, seed=1)


def cases(shape: harness.Shape, batch: int, dtype: torch.dtype, device: torch.device, args) -> list:
    if dtype != torch.float32:
        return [harness.Skip(OP, "all", "select reads the float32 scores whatever the model dtype: measured at fp32")]
    attn, info = scores(shape, batch, device)
    _, k1, _, _ = python_ref.budget_split(shape.num_visual, shape.budget)
    io = batch * (2 * 4 * shape.num_visual + 8 * k1)
    t = shape.budget
    return [
        harness.Case(OP, harness.package_impl(OP, device), lambda: tk.select(attn, info, t, check_finite=False), io, 0.0),
        harness.Case(OP, "python_ref", lambda: python_ref.select(attn, info, t), io, 0.0),
    ]


def check(shape, batch, dtype, outputs) -> list[str]:
    """The orders must be identical (select is integer bookkeeping: no tolerance)."""
    ref = outputs.get((OP, "python_ref"))
    if ref is None:
        return []
    for (_, impl), out in outputs.items():
        if not torch.equal(out.cpu(), ref.cpu()):
            raise AssertionError(f"{OP} {impl} at {harness.label(shape, batch)}: order differs from python_ref")
    return [f"{OP} {harness.label(shape, batch)}: orders identical to python_ref"]


def main(argv=None) -> harness.Report:
    args = harness.parser(__doc__).parse_args(argv)
    return harness.sweep(OP, args, cases, check)


if __name__ == "__main__":
    main()
