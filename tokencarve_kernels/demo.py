"""`make demo`: carve one LLaVA-1.5-shaped image at the field's three budgets and show what was kept.

The input is embedded (generated from a fixed seed): 576 visual tokens of width 4096 laid out on the
24 x 24 patch grid, a textured object on a flat, near-duplicate background, hidden states with a decaying
spectrum, and a last-query attention that peaks on the object. Prints, per budget: tokens kept, the
KV cache saved for LLaVA-1.5-7B, and the time of `carve` against the authors' scoring (a float32 SVD with
full matrices) measured side by side; then the 24 x 24 grid of kept / merged / dropped patches, also
written as a PNG.

    python -m tokencarve_kernels.demo [--png PATH] [--repeats N]
"""

import argparse
import statistics
import struct
import time
import zlib

import torch

import python_ref
import tokencarve_kernels as tk

GRID = 24                    # LLaVA-1.5: 336 px / 14 px patches
NUM_VISUAL = GRID * GRID     # 576
DIM = 4096                   # Llama-2-7B hidden size
BUDGETS = (192, 128, 64)
# LLaVA-1.5-7B KV cache per token: 32 layers x (K + V) x 32 heads x 128 dims x 2 bytes (fp16).
KV_BYTES_PER_TOKEN = 32 * 2 * 32 * 128 * 2
PROMPT_TOKENS = 36 + NUM_VISUAL + 30   # system prompt, image, a short question
KEPT, MERGED, DROPPED = "#", "+", "."
COLOURS = {KEPT: (40, 40, 40), MERGED: (240, 120, 160), DROPPED: (215, 215, 215)}


def embedded_image(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [1, 576, 4096] float32 and attn [1, 576], a synthetic image on the 24 x 24 grid."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    on_object = (((yy - 9.5) / 6.0) ** 2 + ((xx - 13.5) / 7.5) ** 2 <= 1.0).flatten()
    rank = 96
    basis = torch.linalg.qr(torch.randn(DIM, rank, generator=gen)).Q.T            # [rank, D]
    spectrum = torch.logspace(1.5, -2.0, rank)
    coords = torch.randn(NUM_VISUAL, rank, generator=gen) * spectrum
    background = torch.randn(rank, generator=gen) * spectrum
    # the background is one feature plus small noise: near-duplicate patches, natural merge candidates
    coords[~on_object] = background + 0.05 * coords[~on_object]
    hidden = coords @ basis + 0.01 * torch.randn(NUM_VISUAL, DIM, generator=gen)
    logits = torch.randn(NUM_VISUAL, generator=gen) + 2.5 * on_object.float()
    attn = torch.softmax(logits, dim=0) * 0.4      # the softmax also covers the text: sum < 1
    return hidden[None], attn[None]


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def grid_of(hidden: torch.Tensor, attn: torch.Tensor, budget: int) -> list[str]:
    """The 24 x 24 picture of one carve: kept, merged into a kept token, or dropped in stage I."""
    order = tk.select(attn, tk.info_scores(hidden), budget)
    _, keep_idx, _ = tk.merge(hidden, order, budget)
    cells = [DROPPED] * NUM_VISUAL
    for token in order[0].tolist():
        cells[token] = MERGED
    for token in keep_idx[0].tolist():
        cells[token] = KEPT
    return ["".join(cells[r * GRID : (r + 1) * GRID]) for r in range(GRID)]


def write_png(path: str, grids: list[list[str]], cell: int = 12, gap: int = 24) -> None:
    """Grids side by side as an RGB PNG (no imaging dependency: zlib and struct suffice)."""
    width = len(grids) * GRID * cell + (len(grids) - 1) * gap
    height = GRID * cell
    rows = []
    for y in range(height):
        row = bytearray(b"\x00")  # filter type 0
        for g, grid in enumerate(grids):
            for x in range(GRID):  # a one-pixel white line closes every cell
                colour = (255, 255, 255) if y % cell == cell - 1 else COLOURS[grid[y // cell][x]]
                row += bytes(colour) * (cell - 1) + b"\xff\xff\xff"
            if g < len(grids) - 1:
                row += b"\xff" * (3 * gap)
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", default="tokencarve_demo.png", help="where to write the kept/merged/dropped grids")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    args = parser.parse_args(argv)

    hidden, attn = embedded_image()
    authors_ms = _median_ms(lambda: python_ref.authors_info_scores(hidden), args.repeats)
    print(f"TokenCarve on one LLaVA-1.5-shaped image: Nv = {NUM_VISUAL} visual tokens, D = {DIM}, "
          f"{torch.get_num_threads()} CPU threads")
    header = f"{'budget':>6} {'kept':>5} {'merged':>6} {'dropped':>7} {'KV saved (7B fp16)':>19} {'of prompt':>9} " \
             f"{'carve ms':>9} {'authors SVD ms':>14} {'speed-up':>8}"
    print(header)
    print("-" * len(header))
    rows, grids = [], []
    for budget in BUDGETS:
        carve_ms = _median_ms(lambda: tk.carve(hidden, attn, budget), args.repeats)
        grid = grid_of(hidden, attn, budget)
        cells = "".join(grid)
        saved = (NUM_VISUAL - budget) * KV_BYTES_PER_TOKEN
        row = {
            "budget": budget,
            "kept": cells.count(KEPT),
            "merged": cells.count(MERGED),
            "dropped": cells.count(DROPPED),
            "kv_saved_mib": saved / 2**20,
            "kv_saved_fraction": (NUM_VISUAL - budget) / PROMPT_TOKENS,
            "carve_ms": carve_ms,
            "authors_ms": authors_ms,
        }
        rows.append(row)
        grids.append(grid)
        print(f"{budget:>6} {row['kept']:>5} {row['merged']:>6} {row['dropped']:>7} {row['kv_saved_mib']:>15.0f} MiB "
              f"{row['kv_saved_fraction']:>9.0%} {carve_ms:>9.1f} {authors_ms:>14.1f} {authors_ms / carve_ms:>7.1f}x")
    print(f"\n(KV share of a {PROMPT_TOKENS}-token prompt: 36 system + 576 image + 30 text tokens; "
          f"'authors SVD' is their scoring step alone, carve is all of it.)")
    print(f"\n24 x 24 patch grid, budgets {' / '.join(map(str, BUDGETS))}:  {KEPT} kept  {MERGED} merged  {DROPPED} dropped")
    for r in range(GRID):
        print("   ".join(grid[r] for grid in grids))
    write_png(args.png, grids)
    print(f"\nwrote {args.png}")
    return rows


if __name__ == "__main__":
    main()
