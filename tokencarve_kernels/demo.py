"""`make demo`: carve one LLaVA-1.5-shaped image at the field's three budgets and show what was kept.

The input is embedded (generated from a fixed seed): 576 visual tokens of width 4096 laid out on the
24 x 24 patch grid, a textured object on a flat, near-duplicate background, hidden states with a decaying
spectrum, and a last-query attention that peaks on the object. Prints, per budget: tokens kept, the
KV cache saved for LLaVA-1.5-7B, and the time of `carve` against the authors' scoring (a float32 SVD with
full matrices) measured side by side; then the 24 x 24 grid of kept / merged / dropped patches, also
written as a PNG. Then, when transformers is installed, a tiny random-weight LLaVA-1.5 (the real image
layout: 576 visual tokens in a 642-token prompt, a narrow 4-layer text model) generates end to end without
and with `apply_tokencarve`, and both outputs and the savings are printed.

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


LLAVA_IMAGE_TOKEN = 32000
LLAVA_PROMPT = (36, 30)      # system tokens before the image, question tokens after it
LLAVA_NEW_TOKENS = 12
LLAVA_PREFILL_REPEATS = 3   # prefill timed as a median, after one warm-up call per configuration


def llava_15_config(text_layers: int, text_dim: int, vision_layers: int, vision_dim: int):
    """A LLaVA-1.5 config with the real image layout (CLIP at 336 px, 14 px patches: 576 visual tokens, [CLS]
    dropped, penultimate ViT layer, <image> = token 32000 of a 32064-word Llama vocabulary) and chosen widths.
    LLaVA-1.5-7B is llava_15_config(32, 4096, 24, 1024)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=vision_dim, intermediate_size=4 * vision_dim, num_hidden_layers=vision_layers,
                              num_attention_heads=max(1, vision_dim // 64), image_size=336, patch_size=14,
                              projection_dim=min(768, vision_dim))
    text = LlamaConfig(hidden_size=text_dim, intermediate_size=11008 * text_dim // 4096, num_hidden_layers=text_layers,
                       num_attention_heads=max(1, text_dim // 128), vocab_size=32064, max_position_embeddings=4096,
                       pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=LLAVA_IMAGE_TOKEN,
                       vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=NUM_VISUAL)


def llava_prompt(seed: int = 0) -> dict:
    """input_ids [1, 642] (36 system tokens, 576 image tokens, 30 question tokens) and one 336 px picture."""
    gen = torch.Generator().manual_seed(seed)
    before, after = LLAVA_PROMPT
    ids = torch.cat([torch.ones(1, dtype=torch.long), torch.randint(100, 32000, (before - 1,), generator=gen),
                     torch.full((NUM_VISUAL,), LLAVA_IMAGE_TOKEN), torch.randint(100, 32000, (after,), generator=gen)])
    return {"input_ids": ids[None], "pixel_values": torch.randn(1, 3, 336, 336, generator=gen)}


def tiny_llava_end_to_end(budget: int = 128) -> dict:
    """Generate with a tiny random LLaVA-1.5 without and with TokenCarve; print both outputs and the savings."""
    from transformers import LlavaForConditionalGeneration

    from .integrations.hf import _cache_of, apply_tokencarve

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(llava_15_config(4, 128, 2, 64)).eval()
    with torch.no_grad():   # wider than the default 0.02 init, or greedy decoding repeats one token whatever the input
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.1)
    inputs = llava_prompt()
    n = inputs["input_ids"].shape[1]

    def prefill():
        return model(**inputs, use_cache=True, logits_to_keep=1)

    def run() -> dict:
        with torch.no_grad():
            out = prefill()   # also the warm-up of this configuration
            prefill_ms = _median_ms(prefill, LLAVA_PREFILL_REPEATS)
            cache = _cache_of(out)
            tokens = model.generate(**inputs, max_new_tokens=LLAVA_NEW_TOKENS, min_new_tokens=LLAVA_NEW_TOKENS,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
        return {"tokens": tokens[0, n:].tolist(), "cached": cache.layers[0].keys.shape[-2], "prefill_ms": prefill_ms,
                "kv_bytes": sum(entry.keys.nbytes + entry.values.nbytes for entry in cache.layers)}

    plain = run()
    with apply_tokencarve(model, budget=budget) as handle:
        carved = run()
        kept = handle.kept_positions[0]
    start = LLAVA_PROMPT[0]
    kept_visual = int(((kept >= start) & (kept < start + NUM_VISUAL)).sum())
    print(f"\nTiny LLaVA-1.5 end to end (random weights, transformers; 576 visual tokens in a {n}-token prompt, "
          f"text model 4 layers x 128): apply_tokencarve(model, budget={budget})")
    for label, run_ in (("without carving", plain), (f"TokenCarve T={budget}", carved)):
        print(f"  {label:<16} prompt in KV cache {run_['cached']:>4} tokens, {run_['kv_bytes'] / 2**20:5.2f} MiB, "
              f"prefill {run_['prefill_ms']:7.1f} ms, generated ids {run_['tokens']}")
    same = sum(a == b for a, b in zip(plain["tokens"], carved["tokens"]))
    print(f"  savings: {n - carved['cached']} of {n} prompt tokens ({1 - carved['cached'] / n:.0%}) and "
          f"{1 - carved['kv_bytes'] / plain['kv_bytes']:.0%} of the KV cache ({kept_visual} visual tokens kept); "
          f"prefill {plain['prefill_ms'] / carved['prefill_ms']:.2f}x faster (medians of {LLAVA_PREFILL_REPEATS} runs). {same} of "
          f"{LLAVA_NEW_TOKENS} generated tokens agree: with random weights that says nothing about accuracy.")
    return {"plain": plain, "carved": carved, "prompt_tokens": n, "kept_visual": kept_visual}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", default="tokencarve_demo.png", help="where to write the kept/merged/dropped grids")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--no-llava", dest="llava", action="store_false", help="skip the tiny LLaVA generation")
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
    if args.llava:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("\n(transformers is not installed: pip install 'tokencarve-kernels[hf]' for the tiny LLaVA run)")
        else:
            tiny_llava_end_to_end()
    return rows


if __name__ == "__main__":
    main()
