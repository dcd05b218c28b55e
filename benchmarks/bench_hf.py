"""TokenCarve in a transformers LLaVA: prefill time, KV-cache bytes (and decode speed) against the unpatched model.

Random weights, LLaVA-1.5 layout: one 336 px image = 576 visual tokens at offset 36 of a 642-token prompt
(36 system + 576 image + 30 question tokens), batch 1, greedy. Every configuration runs on the same weights
side by side, so only the ratios mean anything:
  unpatched            the model as loaded (SDPA attention)
  tokencarve T         apply_tokencarve(model, budget=T): SDPA stays on, the attention row is recomputed
                       from layer 1's q and k, float64 Gram + eigh scores
  authors T            the authors' approach emulated: eager attention in every layer and their float32
                       full-matrices SVD scores (python_ref.authors_info_scores) via carve_fn
The FLOP column is the speed-up the text model's FLOPs predict for the prefill (layers 0..layer-1 on N
tokens, the others on N - 576 + T; the vision tower is outside it).

    python -m benchmarks.bench_hf --threads 1          # CPU: 8 layers, D = 1024 (about 2 minutes); on a shared
                                                       # machine one thread gives steadier ratios than two
    python -m benchmarks.bench_hf --device cuda        # GPU: LLaVA-1.5-7B shapes in bf16, TTFT and decode
    python -m benchmarks.bench_hf --layers 2 --dim 64 --layer 1 --repeats 3   # seconds: the script runs

Prefills are timed by benchmarks/harness.py (measure_many: the configurations take turns, so a change in the
machine's load shifts all of them alike; CUDA events on a GPU), 5 times each on the CPU and 10 on a GPU unless
--repeats says otherwise. One row per configuration is appended to
benchmarks/out/bench_hf.csv (--csv), with the device, versions and git SHA.
"""

import contextlib
import functools
import os
import statistics
import time

import torch

import tokencarve_kernels as tk
from benchmarks import harness
from benchmarks.bench_carve import authors_carve
from tokencarve_kernels.demo import NUM_VISUAL, llava_15_config, llava_prompt
from tokencarve_kernels.integrations.hf import _cache_kwarg, _cache_of, apply_tokencarve

BUDGETS = (576, 192, 128, 64)


def build(device: str, dtype: torch.dtype, layers: int | None, dim: int | None):
    """LLaVA-1.5-7B shapes on a GPU; on the CPU a shallower, narrower text model and a 2-layer ViT (the same image
    layout), so that the CPU time, like the GPU time, goes to the text model."""
    from transformers import LlavaForConditionalGeneration

    if device == "cuda":
        config = llava_15_config(layers or 32, dim or 4096, 24, 1024)
    else:
        config = llava_15_config(layers or 8, dim or 1024, 2, 256)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):   # initialised where it runs: a 7B model never passes through host memory
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def prompt(device: str, dtype: torch.dtype) -> dict:
    inputs = llava_prompt()
    return {"input_ids": inputs["input_ids"].to(device), "pixel_values": inputs["pixel_values"].to(device, dtype)}


def flop_speedup(config, n: int, budget: int, layer: int) -> float:
    """Prefill FLOPs of the text model unpatched over carved (projections, MLP and causal attention)."""
    text = config.text_config
    d, inter, n_layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    carved = n - NUM_VISUAL + min(budget, NUM_VISUAL)

    def layer_flops(tokens):
        return 2 * tokens * (4 * d * d + 3 * d * inter) + 2 * tokens * tokens * d   # causal: half of 4 N^2 d

    return n_layers * layer_flops(n) / (layer * layer_flops(n) + (n_layers - layer) * layer_flops(carved))


@contextlib.contextmanager
def configured(model, config: dict, layer: int):
    """The model as one row of the table runs it: attention implementation, and the patch if any."""
    model.config._attn_implementation = config["attn"]   # propagates to every attention module's config
    try:
        if not config["patch"]:
            yield
        else:
            with apply_tokencarve(model, budget=config["budget"], layer=layer, carve_fn=config["carve_fn"]):
                yield
    finally:
        model.config._attn_implementation = "sdpa"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def prefill(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=True, logits_to_keep=1)


def decode_rate(model, inputs, device: str, steps: int) -> float:
    """Greedy decode steps per second after one prefill."""
    arg = _cache_kwarg(model)
    out = prefill(model, inputs)
    cache, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            token = model(input_ids=token, use_cache=True, logits_to_keep=1, **{arg: cache}).logits.argmax(-1)
    _sync(device)
    return steps / (time.perf_counter() - start)


def configurations(with_authors: bool) -> list[dict]:
    rows = [{"config": "unpatched (sdpa)", "budget": NUM_VISUAL, "attn": "sdpa", "patch": False, "carve_fn": None}]
    rows += [{"config": f"tokencarve T={t}", "budget": t, "attn": "sdpa", "patch": True, "carve_fn": None} for t in BUDGETS]
    if with_authors:
        # Their scores, the package's select and merge: only the scoring (and eager attention) differ from ours.
        carve_fn = functools.partial(authors_carve, ops=torch.ops.tokencarve)
        rows += [{"config": f"authors T={t} (eager + fp32 SVD)", "budget": t, "attn": "eager", "patch": True,
                  "carve_fn": carve_fn} for t in BUDGETS[1:]]
    return rows


def measure_all(model, inputs, configs: list[dict], device: str, layer: int, repeats: int, decode: int,
                max_seconds: float) -> None:
    """Fills each configuration's prefill_ms / p20_ms / p80_ms, kv_bytes and carved_len (read from its last
    prefill's cache) and decode_tok_s (median), or None without --decode.

    Prefills: harness.measure_many, so the configurations take turns (a change in the machine's load shifts them
    alike). Applying and removing the patch happens inside the timed call: microseconds of Python next to a prefill."""

    def configured_prefill(config):
        with configured(model, config, layer):
            return prefill(model, inputs)

    stats, outputs = harness.measure_many([functools.partial(configured_prefill, c) for c in configs], device,
                                          repeats=repeats, max_seconds=max_seconds)
    for config, stat, out in zip(configs, stats, outputs):
        cache = _cache_of(out)
        config.update(prefill_ms=stat["median_ms"], p20_ms=stat["p20_ms"], p80_ms=stat["p80_ms"],
                      kv_bytes=sum(e.keys.nbytes + e.values.nbytes for e in cache.layers),
                      carved_len=cache.layers[-1].keys.shape[-2], decode_tok_s=None)
    if decode:
        rates = [[] for _ in configs]
        for _ in range(max(1, repeats // 3)):
            for config, series in zip(configs, rates):
                with configured(model, config, layer):
                    series.append(decode_rate(model, inputs, device, decode))
        for config, series in zip(configs, rates):
            config["decode_tok_s"] = statistics.median(series)


def report(configs: list[dict], model, n: int, layer: int, decode: int, gpu: bool) -> list[dict]:
    """Prints the table and returns one row per configuration. Raises if a configuration's KV cache does not hold
    the prompt carved to its budget (N - 576 + T tokens): its times would then be of something else."""
    base = configs[0]
    head = (f"{'configuration':<36} {'N_kv':>5} {'TTFT ms' if gpu else 'prefill ms':>10} {'speed-up':>8} "
            f"{'FLOPs say':>9} {'KV bytes':>9}")
    if decode:
        head += f" {'decode tok/s':>12} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    rows = []
    for config in configs:
        expected = n - NUM_VISUAL + min(config["budget"], NUM_VISUAL)
        if config["carved_len"] != expected:
            raise AssertionError(f"{config['config']}: the KV cache holds {config['carved_len']} tokens, expected "
                                 f"{expected} (N = {n} with {NUM_VISUAL} visual tokens carved to {config['budget']})")
        row = {k: v for k, v in config.items() if k not in ("carve_fn", "patch")}
        row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
        row["kv_ratio"] = row["kv_bytes"] / base["kv_bytes"]
        row["flop_speedup"] = flop_speedup(model.config, n, row["budget"], layer)
        row["decode_ratio"] = row["decode_tok_s"] / base["decode_tok_s"] if decode else None
        line = (f"{row['config']:<36} {row['carved_len']:>5} {row['prefill_ms']:>10.1f} {row['prefill_speedup']:>7.2f}x "
                f"{row['flop_speedup']:>8.2f}x {row['kv_ratio']:>9.3f}")
        if decode:
            line += f" {row['decode_tok_s']:>12.1f} {row['decode_ratio']:>5.2f}x"
        print(line)
        rows.append(row)
    print("(speed-up, KV bytes and decode ratio: against the unpatched SDPA model, same weights, same process, "
          "configurations interleaved; times are medians, for context only)")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = harness.common_arguments(harness.argument_parser(__doc__), repeats=None, max_seconds=60.0,
                                      csv=os.path.join(harness.OUT_DIR, "bench_hf.csv"), devices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=None, help="text decoder layers (default: 8 on CPU, 32 on GPU)")
    parser.add_argument("--dim", type=int, default=None, help="text hidden size (default: 1024 on CPU, 4096 on GPU)")
    parser.add_argument("--layer", type=int, default=2, help="carve between decoder layers layer-1 and layer")
    parser.add_argument("--decode", type=int, default=None, help="decode steps timed (default 0 on CPU, 64 on GPU)")
    parser.add_argument("--no-authors", action="store_true", help="skip the eager + full-SVD emulation")
    args = parser.parse_args(argv)
    with harness.cpu_threads(args.threads):
        return run(args)


def run(args) -> list[dict]:
    gpu = args.device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    repeats = args.repeats or (10 if gpu else 5)
    decode = args.decode if args.decode is not None else (64 if gpu else 0)

    backend = contextlib.nullcontext()
    if gpu:
        try:
            tk.carve(torch.randn(1, 8, 16, device="cuda", dtype=dtype), torch.rand(1, 8, device="cuda"), 4)
        except (NotImplementedError, RuntimeError) as error:   # this install has no CUDA kernels for the ops
            print(f"note: the tokencarve ops have no CUDA kernels here ({str(error).splitlines()[0][:80]}): the carve "
                  f"runs python_ref on the GPU in float64, which overstates its cost")
            backend = tk.use_backend("ref")
    torch.manual_seed(0)
    model = build(args.device, dtype, args.layers, args.dim)
    inputs = prompt(args.device, dtype)
    n = inputs["input_ids"].shape[1]
    text = model.config.text_config
    print(f"LLaVA-shaped random model on {harness.device_name(args.device)}, {dtype}: text {text.num_hidden_layers} layers, "
          f"D = {text.hidden_size}, prompt N = {n} ({NUM_VISUAL} visual), batch 1, carve at layer {args.layer}, "
          f"torch {torch.__version__}")
    configs = configurations(not args.no_authors)
    with backend:
        measure_all(model, inputs, configs, args.device, args.layer, repeats, decode, args.max_seconds)
    rows = report(configs, model, n, args.layer, decode, gpu)
    meta = dict(device=harness.device_name(args.device), dtype=str(dtype).removeprefix("torch."),
                text_layers=text.num_hidden_layers, text_dim=text.hidden_size, prompt_tokens=n, layer=args.layer,
                sha=harness.git_sha(), run=harness.RUN_ID, **harness.versions())
    rows = [{**row, **meta} for row in rows]
    if not args.no_csv:
        harness.append_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
