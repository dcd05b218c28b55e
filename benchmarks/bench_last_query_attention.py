"""last_query_attention: the last prompt token's head-mean attention over the visual keys.

    python -m benchmarks.bench_last_query_attention [--device cuda] [--dtype fp32 bf16 fp16] [--batch 1 8] [--full]
    python -m benchmarks.bench_last_query_attention --device cuda --dtype bf16 --shapes llava15 llava15_gqa video_long

Impls: the op (C++ on the CPU, "tokencarve"; Triton on CUDA, "triton"); python_ref (float64); torch_fp32
(python_ref's formula run in float32: the obvious PyTorch route, K repeated over the query groups, one
[B, Hq, N] row of logits, softmax, head mean); authors (the eager route the authors force in every layer: all
N queries against all N keys, the causal N x N probabilities, then their last row).
Shapes beyond --full: llava15_gqa (Hk = 8 key heads for Hq = 32) and video_long (N = 32892 keys).

Cost model per image, N keys, Hq query heads, Hk key heads of size d, element size e:
  op, python_ref, bytes = e (Hq d + Hk N d) + 4 Nv             q and K read once, the row written (float32)
  torch_fp32      flops = 2 Hq N d                              the logits (exponentials not counted)
  authors         bytes = e (Hq N d + Hk N d) + 2 e Hq N^2 + 4 Nv  all queries and K read once; the N x N
                                                                logits written once and read once (the least
                                                                any unfused softmax over them moves)
                  flops = 2 Hq N^2 d
authors is skipped where its live N x N tensors (logits, scaled, masked, softmax: 4 e Hq N^2 per image) exceed
half the free memory: on a 24 GiB CPU, LLaVA-NeXT (N = 3004) at B = 8 and video (N = 16508) at any B.
"""

import torch

import python_ref
import tokencarve_kernels as tk
from benchmarks import harness

OP = "last_query_attention"


def cases(shape: harness.Shape, batch: int, dtype: torch.dtype, device: torch.device, args) -> list:
    q, k = harness.queries_keys(shape, batch, dtype, device)
    e = harness.element_size(dtype)
    n, hq, hk, d, nv = shape.num_keys, shape.heads_q, shape.heads_k, shape.head_dim, shape.num_visual
    start, scale = shape.prefix, d ** -0.5
    row_bytes = batch * (e * (hq * d + hk * n * d) + 4 * nv)
    row_flops = batch * 2 * hq * n * d
    eager_peak = 4 * e * batch * hq * n * n
    eager_cost = (batch * (e * (hq * n * d + hk * n * d) + 2 * e * hq * n * n + 4 * nv), batch * 2 * hq * n * n * d)
    out = [
        harness.Case(OP, harness.package_impl(OP, device),
                     lambda: tk.last_query_attention(q, k, start, nv, scale, check_finite=False), row_bytes, row_flops),
        harness.Case(OP, "python_ref", lambda: python_ref.last_query_attention(q, k, start, nv, scale), row_bytes,
                     row_flops, "fp64", "float64", batch * 8 * hq * n * (d + 2)),
        harness.Case(OP, "torch_fp32", lambda: python_ref.last_query_attention(q, k, start, nv, scale, torch.float32),
                     row_bytes, row_flops, "fp32", "float32 torch ops", batch * 4 * hq * n * (d + 2)),
    ]
    if reason := harness.too_big(eager_peak, device):
        return out + [harness.Skip(OP, "authors", reason)]
    # The eager route needs every query: K (repeated over the query groups) stands in for the first N - 1,
    # and the last one is q, so the row it returns is the very answer of the other impls.
    q_all = k.repeat_interleave(hq // hk, dim=1).clone()
    q_all[:, :, -1] = q
    return out + [harness.Case(OP, "authors", lambda: python_ref.eager_last_query_attention(q_all, k, start, nv, scale),
                               *eager_cost, note="eager N x N attention, last row", peak_bytes=eager_peak)]


def check(shape, batch, dtype, outputs) -> list[str]:
    return harness.compare_scores(OP, shape, batch, dtype, outputs)


def main(argv=None) -> harness.Report:
    args = harness.parser(__doc__).parse_args(argv)
    return harness.sweep(OP, args, cases, check)


if __name__ == "__main__":
    main()
