"""How the information score's cost grows with the number of visual tokens: exact and randomized.

    python -m benchmarks.scale_info_scores [--device cpu|cuda] [--dim 1024] [--ranks 128,256]
                                           [--nvs 256,576,1152,...] [--png PATH]
    python -m benchmarks.scale_info_scores --device cuda --dim 4096 --nvs 576,2880,16384 --ranks 64,128,256

Times `torch.ops.tokencarve.info_scores` (CPU: the C++ kernel; CUDA: the Triton kernels) on one image
of hidden states from tests/inputs.hidden_states at D = --dim, for Nv from well below D to 16 D. Once
Nv > D the exact path works on the D x D Gram (X^T X, eigh, then |X V| row sums) and the randomized one
on [Nv, rank] sketches, so both should grow linearly in Nv there; the script prints the log-log slope
of each curve over Nv >= 2 D, appends rows to benchmarks/out/results.csv (benchmarks/harness.py) and
plots time against Nv on log-log axes with a slope-1 guide (benchmarks/out/scale_info_scores_<device>.png).
The second command is the GPU's: LLaVA-1.5, LLaVA-NeXT and video sizes at Llama-2-7B's width.

At each Nv the exact and randomized calls are timed side by side (harness.measure_many), and each output is
checked against python_ref's (the exact one computed by float64 Gram + eigh, the randomized one by the same
seeded algorithm) to harness.PACKAGE_TOLERANCE: a wrong computation stops the run. On the CPU it times one
thread by its process CPU time (harness's "process" clock): on a shared machine wall time measures the
neighbours' load, while the CPU time of one thread measures the work, which is what the growth in Nv is about.
On a GPU, CUDA events.
"""

import math
import os

import torch

import python_ref
import tokencarve_kernels  # noqa: F401  (registers the ops)
from benchmarks.bench_info_scores import exact_flops, randomized_flops
from benchmarks.harness import (OUT_DIR, PACKAGE_TOLERANCE, Row, append_csv, argument_parser, common_arguments,
                                cpu_threads, device_name, measure_many)
from tests.inputs import hidden_states, rel_err


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of log(time) against log(Nv)."""
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def plot(curves: dict[str, list[tuple[int, float]]], dim: int, device: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, points in curves.items():
        ax.plot([n for n, _ in points], [t for _, t in points], marker="o", label=name)
    exact = curves["exact"]
    anchor_n, anchor_t = exact[-1]
    ns = [n for n, _ in exact if n >= dim]
    ax.plot(ns, [anchor_t * n / anchor_n for n in ns], "k--", linewidth=0.8, label="slope 1 (linear in Nv)")
    ax.axvline(dim, color="grey", linewidth=0.6)
    ax.text(dim, 0.02, " Nv = D", color="grey", va="bottom", transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("visual tokens Nv")
    ax.set_ylabel("median CPU time of one thread (ms)" if device == "cpu" else "median time (ms)")
    ax.set_title(f"info_scores, D = {dim}, {device_name(device)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict[str, list[tuple[int, float]]]:
    """Returns the curves: {"exact" or "rank k": [(Nv, median ms), ...]}."""
    # No --threads: one thread on the CPU, whose process time is then the work of one call.
    parser = common_arguments(argument_parser(__doc__), repeats=5, max_seconds=60.0, threads=False)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--ranks", default="128,256", help="randomized ranks to time beside the exact score")
    parser.add_argument("--nvs", default=None, help="comma-separated Nv values (default: D/4 .. 16 D)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    with cpu_threads(1 if torch.device(args.device).type == "cpu" else None):
        return run(args)


def run(args) -> dict[str, list[tuple[int, float]]]:
    dim, device, dtype = args.dim, torch.device(args.device), getattr(torch, args.dtype)
    default_nvs = [dim // 4, 576, dim, 2 * dim, 4 * dim, 8 * dim, 16 * dim]
    nvs = sorted(set(int(v) for v in args.nvs.split(",")) if args.nvs else set(default_nvs))
    ranks = [int(r) for r in args.ranks.split(",") if r]
    names = ["exact", *(f"rank {r}" for r in ranks)]
    curves = {name: [] for name in names}
    rows = []
    op = torch.ops.tokencarve.info_scores
    clock = "process" if device.type == "cpu" else "wall"
    for nv in nvs:
        hidden = hidden_states(1, nv, dim, seed=nv, dtype=dtype).to(device)
        fns = [lambda rank=rank: op(hidden, rank, 0) for rank in [0, *ranks]]
        stats, outputs = measure_many(fns, device, repeats=args.repeats, max_seconds=args.max_seconds, clock=clock)
        for name, rank, stat, out in zip(names, [0, *ranks], stats, outputs):
            ref = python_ref.info_scores(hidden, rank, 0, method="gram")
            err = rel_err(out, ref)
            if not err <= PACKAGE_TOLERANCE:
                raise AssertionError(f"info_scores {name} at Nv={nv} D={dim}: rel err {err:.1e} vs python_ref")
            curves[name].append((nv, stat["median_ms"]))
            flops = exact_flops(nv, dim) if rank == 0 else randomized_flops(nv, dim, rank)
            rows.append(Row.from_stats("info_scores_scale", name.replace(" ", ""), f"Nv={nv},D={dim}", args.dtype, stat,
                                       bytes=hidden.numel() * hidden.element_size(), flops=flops,
                                       flop_dtype="fp64").complete(device))
            print(f"Nv={nv:6d} D={dim} {name:>9}: {stat['median_ms']:10.2f} ms   (rel err vs python_ref {err:.1e})")
    if not args.no_csv:
        append_csv(rows, args.csv)
    print()
    for name, points in curves.items():
        tail = [(n, t) for n, t in points if n >= 2 * dim]
        if len(tail) >= 2:
            # A constant eigensolver term bends the log-log slope below 1 at small Nv; a constant cost per
            # added token is the sign of linear growth.
            per_token = ", ".join(f"{(t1 - t0) / (n1 - n0) * 1e3:.1f}" for (n0, t0), (n1, t1) in zip(tail, tail[1:]))
            print(f"{name}: log-log slope over Nv >= 2 D = {_slope(tail):.2f}; us per added token between "
                  f"successive Nv: {per_token}")
    path = args.png or os.path.join(OUT_DIR, f"scale_info_scores_{device.type}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        plot(curves, dim, args.device, path)
        print(f"wrote {path}")
    except ImportError:  # the rows are in results.csv: benchmarks/plot.py can draw them where matplotlib is
        print("matplotlib is not installed: no plot")
    return curves


if __name__ == "__main__":
    main()
