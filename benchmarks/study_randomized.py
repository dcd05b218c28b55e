"""How good is the randomized information score, and what is the cheapest configuration that is good enough?

    python -m benchmarks.study_randomized [--quick] [--csv PATH] [--md PATH]
    python -m benchmarks.study_randomized --shape 64 48 --ranks 8 24 --budget 16   # seconds: the script runs
    python -m benchmarks.study_randomized --summarize [--md benchmarks/study_randomized.md]

For hidden states with the structure of tests/inputs.hidden_states (a decaying singular spectrum, a few
massive-activation channels, 10% duplicated patches), at Nv in {576, 2880, 16384} and D in {1024, 4096},
two spectra (decay 6: singular values spanning 10^-6, the tests' default; decay 3: a flatter one), it
compares the randomized score (python_ref's algorithm, float64) against the exact one (float64 Gram +
eigh) at the budget T = 128 (K1 = 192; --budget):

  overlap     |top-K1(randomized) & top-K1(exact)| / K1, ranking by the information score alone
              (select with attn_weight = 0, the harshest case: no attention rank to hide errors);
  ab_agree    of the tokens in both top-K1 sets, the share that falls on the same side of the A/B split
              (A = the best int(K1 / 2): merge destinations; B: merge sources);
  fused       the top-K1 overlap of the paper's fused selection (attn_weight = 0.5) with a synthetic
              attention score (tests/inputs.attention_scores);
  cost        float64 GFLOP of the randomized path, and as a ratio to the exact path's (Gram of the
              smaller side + eigh + scoring). CPU seconds of both go to the CSV too, but on a shared
              2-core machine they are noise; benchmarks/scale_info_scores.py times the op's two paths
              side by side (on a GPU too), benchmarks/bench_info_scores.py against the baselines.

Configurations: rank k, oversampling p (sketch width l = k + p; the score sums the top k coordinates),
power iterations q, and a tail estimate: "none", or "residual" = add sqrt(2/pi) |r_i| kappa to each
token's L1 norm, where r_i is the part of x_i outside the sketched subspace and kappa = (sum of tail
singular values) / sqrt(sum of their squares) for a geometric tail that starts at the last sketched
singular value and holds exactly the residual energy |X|_F^2 - sum L (a Gaussian model of the tail
coordinates). Rows go to benchmarks/out/study_randomized.csv; a summary table is printed.
--quick: Nv = 576, D = 4096 only, one seed. --shape NV D with --ranks: that one shape, every (p, q), one seed.
"""

import csv
import math
import os
import sys
import time

import torch

import python_ref
from benchmarks.bench_info_scores import exact_flops, randomized_flops
from benchmarks.harness import OUT_DIR, argument_parser, device_name, git_sha, versions
from python_ref.info_scores import randomized_coordinates
from tests.inputs import attention_scores, hidden_states

TARGET = 0.97
BUDGET = 128
TAILS = ("none", "residual")
# (Nv, D) -> (ranks, oversamplings, power iterations, seeds). The defaults (p, q) are decided on Nv = 576,
# LLaVA-1.5's image, with the full grid; the larger images sweep the rank at p = 0 (2880: LLaVA-NeXT's
# five tiles; 16384: a long video), where one run of the reference costs up to a minute here.
GRID = {
    (576, 1024): ((32, 64, 96, 128, 144, 192, 256, 384), (0, 16), (0, 1, 2), (0, 1)),
    (576, 4096): ((32, 64, 96, 128, 144, 192, 256, 384), (0, 16), (0, 1, 2), (0, 1)),
    (2880, 1024): ((64, 128, 192, 256, 384, 512, 720), (0,), (0, 1, 2), (0, 1)),
    (2880, 4096): ((64, 128, 192, 256, 384, 512, 720), (0,), (0, 1, 2), (0,)),
    (16384, 1024): ((128, 256, 384, 512, 768), (0,), (0, 1), (0,)),
    (16384, 4096): ((128, 256, 384, 512, 768), (0,), (0, 1), (0,)),
}


def geometric_tail_kappa(last_sv: float, energy: float, count: int) -> float:
    """kappa = sum s_j / sqrt(sum s_j^2) for s_j = last_sv * rho^j, j < count, with sum s_j^2 = energy."""
    if count <= 0 or energy <= 0.0 or last_sv <= 0.0:
        return 0.0
    target = energy / last_sv**2
    if target >= count:  # no decay fits: a flat tail
        return math.sqrt(count)
    lo, hi = 0.0, 1.0
    for _ in range(80):
        rho = 0.5 * (lo + hi)
        lo, hi = (rho, hi) if (1 - rho ** (2 * count)) / (1 - rho * rho) < target else (lo, rho)
    rho = 0.5 * (lo + hi)
    return (1 - rho**count) / (1 - rho) / math.sqrt((1 - rho ** (2 * count)) / (1 - rho * rho))


def selection_stats(info: torch.Tensor, exact_order: torch.Tensor, exact_fused: torch.Tensor, attn: torch.Tensor,
                    budget: int = BUDGET):
    """(overlap, ab_agree, fused overlap) of one image's scores info [Nv] against the exact selections (exact_order:
    select with attn_weight 0, exact_fused: with 0.5, both [K1]); attn [1, Nv]."""
    order = python_ref.select(attn, info[None].float(), budget, attn_weight=0.0)[0]
    fused = python_ref.select(attn, info[None].float(), budget, attn_weight=0.5)[0]
    k1 = order.shape[0]
    n_a = k1 // 2
    side = {t: i < n_a for i, t in enumerate(order.tolist())}
    exact_side = {t: i < n_a for i, t in enumerate(exact_order.tolist())}
    common = side.keys() & exact_side.keys()
    ab = sum(side[t] == exact_side[t] for t in common) / max(len(common), 1)
    fused_overlap = len(set(fused.tolist()) & set(exact_fused.tolist())) / k1
    return len(common) / k1, ab, fused_overlap


def study_one(nv: int, d: int, decay: float, seed: int, grid, writer, meta, budget: int = BUDGET) -> list[dict]:
    x = hidden_states(1, nv, d, seed=seed, decay=decay).double()
    attn = attention_scores(1, nv, seed=seed)
    start = time.perf_counter()
    exact = python_ref.info_scores_gram(x)[0]
    exact_s = time.perf_counter() - start
    exact_order = python_ref.select(attn, exact[None].float(), budget, attn_weight=0.0)[0]
    exact_fused = python_ref.select(attn, exact[None].float(), budget, attn_weight=0.5)[0]
    m = min(nv, d)
    row_energy = (x[0] ** 2).sum(-1)
    ranks, oversamplings, power_iterations, _ = grid
    rows = []
    for k in ranks:
        if k >= m:
            continue
        for p in oversamplings:
            for q in power_iterations:
                cost = randomized_flops(nv, d, k, oversampling=p, power_iterations=q)
                start = time.perf_counter()
                coords, _ = randomized_coordinates(x, k, seed, oversampling=p, power_iterations=q)
                head = coords[0].abs().sum(-1)
                rand_s = time.perf_counter() - start
                for tail in TAILS:
                    info = head
                    if tail == "residual":
                        captured = (coords[0] ** 2).sum(-1)
                        residual = (row_energy - captured).clamp_min(0.0).sqrt()
                        sv = coords[0].pow(2).sum(0).sqrt()  # the k sketched singular values (ascending)
                        kappa = geometric_tail_kappa(sv[0].item(), (row_energy.sum() - captured.sum()).item(), m - k)
                        info = head + math.sqrt(2 / math.pi) * kappa * residual
                    overlap, ab, fused = selection_stats(info, exact_order, exact_fused, attn, budget)
                    row = dict(nv=nv, d=d, decay=decay, seed=seed, budget=budget, rank=k, oversampling=p,
                               power_iterations=q, tail=tail, overlap=overlap, ab_agree=ab, fused_overlap=fused,
                               gflop=cost / 1e9, flop_ratio=cost / exact_flops(nv, d),
                               cpu_s=rand_s, exact_cpu_s=exact_s, **meta)
                    writer.writerow(row)
                    rows.append(row)
    return rows


def summarize(rows: list[dict]) -> list[str]:
    """Markdown lines: every configuration's worst-seed numbers, the smallest rank per variant that reaches
    TARGET, and per (shape, spectrum) the cheapest configuration that does."""
    lines = []
    print = lines.append  # noqa: A001  (the summary is printed and may be written to a file)
    groups = {}
    for r in rows:
        key = (r["nv"], r["d"], r["decay"], r["rank"], r["oversampling"], r["power_iterations"], r["tail"])
        groups.setdefault(key, []).append(r)
    configs = []
    for key, rs in groups.items():
        nv, d, _, k, p, q, _ = key
        cost = randomized_flops(nv, d, k, oversampling=p, power_iterations=q)
        configs.append(dict(zip(("nv", "d", "decay", "rank", "p", "q", "tail"), key),
                            overlap=min(r["overlap"] for r in rs), ab=min(r["ab_agree"] for r in rs),
                            fused=min(r["fused_overlap"] for r in rs), gflop=cost / 1e9,
                            cost=cost / exact_flops(nv, d)))
    budgets = sorted({r.get("budget", BUDGET) for r in rows})
    at = ", ".join(f"T = {t} (K1 = {int(1.5 * t)})" for t in budgets)
    print(f"\nworst-seed top-K1 overlap at {at}; cost = GFLOP / exact GFLOP")
    print("| Nv | D | decay | rank | p | q | tail | overlap | A/B agree | fused overlap | GFLOP | cost |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in sorted(configs, key=lambda c: (c["nv"], c["d"], -c["decay"], c["rank"], c["p"], c["q"], c["tail"])):
        print(f"| {c['nv']} | {c['d']} | {c['decay']:g} | {c['rank']} | {c['p']} | {c['q']} | {c['tail']} | "
              f"{c['overlap']:.3f} | {c['ab']:.3f} | {c['fused']:.3f} | {c['gflop']:.2f} | {c['cost']:.3f} |")
    print(f"\nsmallest rank whose worst-seed overlap reaches {TARGET} (GFLOP, cost), per (p, q, tail); "
          "- = no rank studied reaches it:")
    variants = sorted({(c["p"], c["q"], c["tail"]) for c in configs})
    print("| Nv | D | decay | " + " | ".join(f"p{p} q{q} {t}" for p, q, t in variants) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in variants) + " |")
    for shape in sorted({(c["nv"], c["d"], c["decay"]) for c in configs}, key=lambda s: (s[0], s[1], -s[2])):
        cells = []
        for variant in variants:
            ran = [c for c in configs
                   if (c["nv"], c["d"], c["decay"]) == shape and (c["p"], c["q"], c["tail"]) == variant]
            c = min((c for c in ran if c["overlap"] >= TARGET), key=lambda c: c["rank"], default=None)
            cells.append(f"{c['rank']} ({c['gflop']:.1f}, {c['cost']:.2f})" if c else ("-" if ran else "not run"))
        print(f"| {shape[0]} | {shape[1]} | {shape[2]:g} | " + " | ".join(cells) + " |")
    print(f"\ncheapest configuration (by GFLOP) reaching overlap >= {TARGET}, per shape and spectrum:")
    for shape in sorted({(c["nv"], c["d"], c["decay"]) for c in configs}):
        cands = [c for c in configs if (c["nv"], c["d"], c["decay"]) == shape]
        good = [c for c in cands if c["overlap"] >= TARGET]
        limit = shape[0] // 4
        best_small = max((c for c in cands if c["rank"] <= limit), key=lambda c: c["overlap"], default=None)
        if good:
            c = min(good, key=lambda c: c["gflop"])
            print(f"  Nv={shape[0]} D={shape[1]} decay={shape[2]:g}: rank {c['rank']} p {c['p']} q {c['q']} tail "
                  f"{c['tail']}: overlap {c['overlap']:.3f}, {c['gflop']:.2f} GFLOP, cost {c['cost']:.3f}")
        else:
            print(f"  Nv={shape[0]} D={shape[1]} decay={shape[2]:g}: none reaches {TARGET}")
        if best_small is not None:
            c = best_small
            print(f"      best with rank <= Nv/4 = {limit}: rank {c['rank']} p {c['p']} q {c['q']} tail {c['tail']}: "
                  f"overlap {c['overlap']:.3f}, cost {c['cost']:.3f}")
    return lines


def main(argv=None) -> list[dict]:
    """Returns the rows written to --csv (or read from it with --summarize)."""
    parser = argument_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="Nv = 576, D = 4096 only, one seed")
    parser.add_argument("--shape", nargs=2, type=int, metavar=("NV", "D"), help="study this shape only (with --ranks)")
    parser.add_argument("--ranks", nargs="+", type=int, help="with --shape: the ranks to study")
    parser.add_argument("--budget", type=int, default=BUDGET, help="T, the tokens kept (K1 = 1.5 T are selected)")
    parser.add_argument("--csv", default=os.path.join(OUT_DIR, "study_randomized.csv"))
    parser.add_argument("--md", default=None, help="also write the summary tables to this markdown file")
    parser.add_argument("--summarize", action="store_true", help="only summarize the rows already in --csv")
    args = parser.parse_args(argv)
    if bool(args.shape) != bool(args.ranks):
        parser.error("--shape and --ranks go together")
    meta = dict(device=device_name("cpu"), sha=git_sha(), **versions())
    if args.summarize:
        rows = _read_rows(args.csv)
        _report(rows, args.md, meta)
        return rows
    if args.shape:
        grid = {tuple(args.shape): (tuple(args.ranks), (0, 16), (0, 1, 2), (0,))}
    elif args.quick:
        grid = {(576, 4096): GRID[576, 4096][:3] + ((0,),)}
    else:
        grid = GRID
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    rows = []
    fields = ["nv", "d", "decay", "seed", "budget", "rank", "oversampling", "power_iterations", "tail", "overlap",
              "ab_agree", "fused_overlap", "gflop", "flop_ratio", "cpu_s", "exact_cpu_s", *meta]
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for (nv, d), shape_grid in grid.items():
            for decay in (6.0, 3.0):
                for seed in shape_grid[3]:
                    start = time.perf_counter()
                    rows += study_one(nv, d, decay, seed, shape_grid, writer, meta, args.budget)
                    f.flush()
                    print(f"Nv={nv} D={d} decay={decay:g} seed={seed}: {time.perf_counter() - start:.0f} s",
                          file=sys.stderr)
    _report(rows, args.md, meta)
    print(f"\nwrote {args.csv}")
    return rows


def _read_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["budget"] = int(r.get("budget") or BUDGET)   # CSVs written before --budget existed: T = 128
        for key in ("nv", "d", "seed", "rank", "oversampling", "power_iterations"):
            r[key] = int(r[key])
        for key in ("decay", "overlap", "ab_agree", "fused_overlap"):
            r[key] = float(r[key])
    return rows


def _report(rows: list[dict], md: str | None, meta: dict) -> None:
    lines = summarize(rows)
    print("\n".join(lines))
    if md:
        with open(md, "w") as f:
            f.write(f"# Randomized information score: accuracy study\n\n`python -m benchmarks.study_randomized` "
                    f"({meta['device']}, torch {meta['torch']}).\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
