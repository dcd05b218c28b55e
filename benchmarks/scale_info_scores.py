"""How the information score's cost grows with the number of visual tokens: exact and randomized.

    python -m benchmarks.scale_info_scores [--device cpu|cuda] [--dim 1024] [--ranks 128,256]
                                           [--nvs 256,576,1152,...] [--png PATH]

Times `torch.ops.tokencarve.info_scores` (CPU: the C++ kernel; CUDA: the Triton kernels) on one image
of hidden states from tests/inputs.hidden_states at D = --dim, for Nv from well below D to 16 D. Once
Nv > D the exact path works on the D x D Gram (X^T X, eigh, then |X V| row sums) and the randomized one
on [Nv, rank] sketches, so both should grow linearly in Nv there; the script prints the log-log slope
of each curve over Nv >= 2 D, appends rows to benchmarks/out/results.csv (benchmarks/harness.py) and
plots time against Nv on log-log axes with a slope-1 guide (benchmarks/out/scale_info_scores_<device>.png).

On the CPU it times one thread by its process CPU time (median of --repeats): on a shared machine wall
time measures the neighbours' load, while the CPU time of one thread measures the work, which is what the
growth in Nv is about. On a GPU it is harness.measure (wall time, synchronised).
"""

import argparse
import math
import os
import statistics
import time

import torch

import tokencarve_kernels  # noqa: F401  (registers the ops)
from benchmarks.harness import OUT_DIR, Row, append_csv, device_name, measure
from python_ref.info_scores import OVERSAMPLING, POWER_ITERATIONS
from tests.inputs import hidden_states


def cpu_time(fn, repeats: int) -> dict:
    """Median, p20 and p80 process CPU time of fn() in ms (call with one torch thread)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p20_ms": pick(0.2), "p80_ms": pick(0.8)}


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--ranks", default="128,256", help="randomized ranks to time beside the exact score")
    parser.add_argument("--nvs", default=None, help="comma-separated Nv values (default: D/4 .. 16 D)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    dim, device, dtype = args.dim, torch.device(args.device), getattr(torch, args.dtype)
    default_nvs = [dim // 4, 576, dim, 2 * dim, 4 * dim, 8 * dim, 16 * dim]
    nvs = sorted(set(int(v) for v in args.nvs.split(",")) if args.nvs else set(default_nvs))
    ranks = [int(r) for r in args.ranks.split(",") if r]
    curves = {"exact": [], **{f"rank {r}": [] for r in ranks}}
    rows = []
    op = torch.ops.tokencarve.info_scores
    if device.type == "cpu":
        torch.set_num_threads(1)
    for nv in nvs:
        hidden = hidden_states(1, nv, dim, seed=nv, dtype=dtype).to(device)
        for rank in [0, *ranks]:
            name = "exact" if rank == 0 else f"rank {rank}"
            run = lambda: op(hidden, rank, 0)  # noqa: E731
            stats = (cpu_time(run, args.repeats) if device.type == "cpu"
                     else measure(run, device, repeats=args.repeats, warmup=1, max_seconds=60.0))
            curves[name].append((nv, stats["median_ms"]))
            m = min(nv, dim)
            width = min(rank + OVERSAMPLING, m)
            flops = nv * dim * m + 9 * m**3 if rank == 0 else (2 + 2 * POWER_ITERATIONS) * 2 * nv * dim * width
            rows.append(Row(op="info_scores_scale", impl=name.replace(" ", ""), shape=f"Nv={nv},D={dim}",
                            dtype=args.dtype, median_ms=stats["median_ms"], p20_ms=stats["p20_ms"],
                            p80_ms=stats["p80_ms"], bytes=hidden.numel() * hidden.element_size(), flops=flops,
                            flop_dtype="fp64").complete(device))
            print(f"Nv={nv:6d} D={dim} {name:>9}: {stats['median_ms']:10.2f} ms")
    append_csv(rows)
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
    except ImportError:  # the lent GPU machines have no matplotlib: the rows are in results.csv
        print("matplotlib is not installed: no plot (benchmarks/plot.py can draw results.csv elsewhere)")


if __name__ == "__main__":
    main()
