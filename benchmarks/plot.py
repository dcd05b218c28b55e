"""Render benchmarks/out/results.csv as PNGs: per op, median time against shape for each implementation.

    python -m benchmarks.plot [--csv PATH] [--out DIR]

One figure per (op, device): x = the shape column (as written by the benchmark), y = median ms with the
p20-p80 band, one line per implementation (log scale: the baselines are orders of magnitude apart).
"""

import csv
import os
from collections import defaultdict

from benchmarks.harness import OUT_DIR, RESULTS_CSV, argument_parser


def load(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def render(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for row in rows:
        groups[(row["op"], row["device"])].append(row)
    written = []
    for (op, device), group in sorted(groups.items()):
        # the latest measurement of each (impl, shape, dtype) wins
        latest = {(r["impl"], r["shape"], r["dtype"]): r for r in group}
        shapes = list(dict.fromkeys(r["shape"] for r in latest.values()))
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(shapes) + 3), 4))
        for impl in sorted({k[0] for k in latest}):
            for dtype in sorted({k[2] for k in latest if k[0] == impl}):
                pts = [(shapes.index(k[1]), latest[k]) for k in latest if k[0] == impl and k[2] == dtype]
                pts.sort(key=lambda p: p[0])
                xs = [p[0] for p in pts]
                ax.plot(xs, [float(p[1]["median_ms"]) for p in pts], marker="o", label=f"{impl} {dtype}")
                ax.fill_between(xs, [float(p[1]["p20_ms"]) for p in pts], [float(p[1]["p80_ms"]) for p in pts], alpha=0.2)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (p20-p80 band)")
        ax.set_title(f"{op} on {device}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = os.path.join(out_dir, f"{op}_{''.join(c if c.isalnum() else '_' for c in device)[:40]}.png")
        fig.savefig(name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def main(argv=None) -> list[str]:
    parser = argument_parser(__doc__)
    parser.add_argument("--csv", default=RESULTS_CSV)
    parser.add_argument("--out", default=OUT_DIR)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    written = render(load(args.csv), args.out)
    for path in written:
        print("wrote", path)
    return written


if __name__ == "__main__":
    main()
