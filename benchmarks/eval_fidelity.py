"""Information preservation at equal budget: every method of eval_methods inside one LLaVA-1.5-shaped model.

No multimodal weights can be had offline on these machines, so the model is a RANDOM-WEIGHT LLaVA-1.5
(transformers' LlavaForConditionalGeneration built from a config: the real image layout - a CLIP ViT at
336 px with 14 px patches, 576 visual tokens on a 24 x 24 grid, [CLS] dropped, features from the
penultimate ViT layer, a 2-layer projector - with a small Llama text model). Its numbers measure how much
each method perturbs this network's output, not accuracy on any task.

What makes them as meaningful as a random network allows:
  * weights: every matrix (linear, conv, embedding table) drawn N(0, (1.6 / sqrt(fan_in))^2), fan_in its
    input width: the tests' tiny models (std 0.2 at width 64, tests/hf_models.py) scaled with width, chosen
    before any method ran, by what the full model does alone (measured on the standard model, 3 images): at
    the configs' own init (std 0.02) the next-token distribution is nearly uniform (entropy 10.32 of
    ln 32064 = 10.38 nats), another image moves it by a KL of 0.04-0.10 and greedy decoding repeats one
    token; at gain 1.0 it still loops; at 1.6 the entropy is about 9.1, another image moves it by about
    2 nats (the "another image" row) and greedy continuations vary. Still far flatter than a trained LM's,
    so a small perturbation flips the argmax: top-1 and prefix agreement are noisy here, KL and rel err
    are the graded measures.
  * images with structure: a flat background with one to three textured ellipses (pixel values in CLIP's
    normalised range), so that patches repeat and some carry more than others;
  * several model seeds x images x prompts (random system and question tokens); mean and spread over them;
  * the methods' own random draws (random selection, the randomized score's sketch) reseeded per sample.
No method has a knob set here: each runs as eval_methods defines it, through the same harness.

In-LLM methods run inside the real forward through `apply_tokencarve(model, budget, carve_fn=...)`: after
decoder layer 1, each method gets the visual hidden states and the last prompt token's attention and
returns its T tokens; the forward continues on the shorter sequence with kept tokens at their original
positions, exactly as TokenCarve itself does.

Embedding-stage TokenCarve (tk.embedding_carve, the serving variant) carves the projector's output before
the LLM, scored by the ViT's [CLS] query over the patch keys of the feature layer. It is fed the way a
serving engine feeds it: the prompt holds k image tokens instead of 576 (N - 576 + k tokens), embedded by
the model's own embedding table with the carved features in the image rows (what LLaVA's forward does with
input_ids and pixel_values), passed as inputs_embeds, so positions are consecutive as in vLLM. Two
diagnostic rows beside it separate its three differences from the in-LLM carve (carve point, scores,
positions): the same carve with original position ids, and random selection at the same point.

Metrics per (method, budget), each sample against the uncarved model on the same input:
  rel err   ||h - h_full|| / ||h_full||, h the last hidden state (after the final norm) at the last position
  KL        KL(p_full || p) of the next-token distribution, nats
  top-1     greedy next-token agreement (1 or 0 per sample)
  prefix    the share of the first `steps` greedily generated tokens before the first disagreement
  spectrum  the paper's measure: sum of singular values of the carved visual states over the full set's, at
            the carve point (decoder layer 1's output; for the embedding stage, the projector's output)

    python -m benchmarks.eval_fidelity            # standard: 24 samples, about 1.5 minutes on 2 idle cores
    python -m benchmarks.eval_fidelity --quick    # a tiny model and one sample, seconds (the tests run it)
"""

import csv
import dataclasses
import math
import os
import statistics
import time

import torch

import tokencarve_kernels as tk
from benchmarks import eval_methods
from benchmarks.harness import OUT_DIR, argument_parser, device_name, git_sha, versions
from tokencarve_kernels.demo import LLAVA_IMAGE_TOKEN, NUM_VISUAL, llava_15_config, llava_prompt
from tokencarve_kernels.integrations.hf import apply_tokencarve

BUDGETS = (192, 128, 64)
GAIN = 1.6          # weight std = GAIN / sqrt(fan_in): tests/hf_models.py's 0.2 at width 64
TEXT_HEADS = 4
CARVE_LAYER = 2     # SPEC.md's work layer: carve between decoder layers 1 and 2
IMAGE_SIDE = 336
EMBEDDING_STAGE = "embedding-stage tokencarve"
EMBEDDING_STAGE_ORIGINAL_POSITIONS = "embedding-stage tokencarve, original positions (diagnostic)"
RANDOM_BEFORE_LLM = "random, before the LLM (diagnostic)"
ANOTHER_IMAGE = "reference: another image"
METRICS = ("rel_err", "kl", "top1", "prefix", "spectrum")


@dataclasses.dataclass(frozen=True)
class Setup:
    text_layers: int
    text_dim: int
    vision_layers: int
    vision_dim: int
    model_seeds: tuple
    images: int
    prompts: int
    steps: int
    budgets: tuple = BUDGETS

    def describe(self) -> str:
        return (f"random-weight LLaVA-1.5 layout (576 visual tokens of a 642-token prompt; CLIP ViT {self.vision_layers} "
                f"layers x {self.vision_dim}, features from its penultimate layer; Llama {self.text_layers} layers x "
                f"{self.text_dim}, {TEXT_HEADS} heads, vocabulary 32064), weights N(0, ({GAIN}/sqrt(fan_in))^2), "
                f"carve after decoder layer {CARVE_LAYER - 1}")


STANDARD = Setup(text_layers=8, text_dim=256, vision_layers=4, vision_dim=128, model_seeds=(0, 1, 2), images=4,
                 prompts=2, steps=8)
QUICK = Setup(text_layers=3, text_dim=64, vision_layers=2, vision_dim=32, model_seeds=(0,), images=1, prompts=1, steps=3,
              budgets=(64,))


# ------------------------------------------------------------------------------------------------ model and inputs
def build_model(setup: Setup, seed: int):
    """LlavaForConditionalGeneration (float32, SDPA, eval) with the LLaVA-1.5 image layout and setup's widths."""
    from transformers import LlavaForConditionalGeneration

    config = llava_15_config(setup.text_layers, setup.text_dim, setup.vision_layers, setup.vision_dim)
    text = config.text_config
    text.num_attention_heads = text.num_key_value_heads = TEXT_HEADS
    text.head_dim = setup.text_dim // TEXT_HEADS
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # norms and biases keep their init (ones, zeros)
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * (GAIN / math.sqrt(param[0].numel())))
    return model.float().eval()


def synthetic_image(seed: int) -> torch.Tensor:
    """pixel_values [1, 3, 336, 336]: a flat background and 1 to 3 striped ellipses, CLIP-normalised range."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(IMAGE_SIDE, dtype=torch.float32), torch.arange(IMAGE_SIDE, dtype=torch.float32),
                            indexing="ij")
    image = (0.8 * torch.randn(3, 1, 1, generator=gen)).expand(3, IMAGE_SIDE, IMAGE_SIDE).clone()
    for _ in range(int(torch.randint(1, 4, (), generator=gen))):
        cy, cx = (torch.rand(2, generator=gen) * 0.6 + 0.2) * IMAGE_SIDE
        ry, rx = (torch.rand(2, generator=gen) * 0.15 + 0.08) * IMAGE_SIDE
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        angle, period = torch.rand(2, generator=gen) * torch.tensor([math.pi, 20.0]) + torch.tensor([0.0, 6.0])
        stripes = torch.sin((xx * torch.cos(angle) + yy * torch.sin(angle)) * (2 * math.pi / period))
        colour, contrast = 0.8 * torch.randn(3, 1, 1, generator=gen), 0.6 * torch.rand(3, 1, 1, generator=gen)
        image = torch.where(inside, colour + contrast * stripes, image)
    return (image + 0.02 * torch.randn(3, IMAGE_SIDE, IMAGE_SIDE, generator=gen))[None]


def image_span(input_ids: torch.Tensor) -> tuple[int, int]:
    """(start, end) of the one run of image tokens in input_ids [1, N]."""
    where = (input_ids[0] == LLAVA_IMAGE_TOKEN).nonzero().squeeze(1).tolist()
    if not where or where[-1] - where[0] + 1 != len(where):
        raise ValueError("input_ids must hold one contiguous run of image tokens")
    return where[0], where[-1] + 1


# ------------------------------------------------------------------------------------------------ metrics
@dataclasses.dataclass
class Outcome:
    hidden: torch.Tensor     # [D] float64: last hidden state (after the final norm) at the last prompt position
    logprobs: torch.Tensor   # [V] float64: next-token log-probabilities
    tokens: list             # the greedy continuation


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return ((other - reference).norm() / reference.norm()).item()


def kl_divergence(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """KL(p || q) in nats from log-probabilities [V] (p the reference)."""
    return (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum().item()


def prefix_agreement(reference: list, tokens: list) -> float:
    """Share of the reference's tokens generated identically before the first disagreement."""
    same = 0
    for a, b in zip(reference, tokens):
        if a != b:
            break
        same += 1
    return same / len(reference)


def compare(full: Outcome, other: Outcome, spectrum: float = float("nan")) -> dict:
    return {"rel_err": relative_error(full.hidden, other.hidden), "kl": kl_divergence(full.logprobs, other.logprobs),
            "top1": float(full.tokens[0] == other.tokens[0]), "prefix": prefix_agreement(full.tokens, other.tokens),
            "spectrum": spectrum}


def generate(model, steps: int, **inputs) -> Outcome:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True, output_hidden_states=True)
    return Outcome(hidden=out.hidden_states[0][-1][0, -1].double(), logprobs=out.logits[0][0].double().log_softmax(-1),
                   tokens=out.sequences[0, -steps:].tolist())


# ------------------------------------------------------------------------------------------------ the two carve points
class PerImage:
    """carve_fn for apply_tokencarve from a batch-1 method: one call per image, each image's spectrum share kept."""

    def __init__(self, method):
        self.method = method
        self.shares: list[float] = []

    def __call__(self, hidden: torch.Tensor, attn: torch.Tensor, budget: int):
        carved, keep = [], []
        for i in range(hidden.shape[0]):
            c, k = self.method(hidden[i : i + 1], attn[i : i + 1], budget)
            self.shares.append(eval_methods.spectrum_share(hidden[i : i + 1], c))
            carved.append(c)
            keep.append(k)
        return torch.cat(carved), torch.cat(keep)


def in_llm(model, method, budget: int, steps: int, inputs: dict) -> tuple[Outcome, float]:
    adapter = PerImage(method)
    with apply_tokencarve(model, budget=budget, layer=CARVE_LAYER, carve_fn=adapter):
        outcome = generate(model, steps, **inputs)
    (share,) = adapter.shares
    return outcome, share


def vision_features(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The projector's output features [1, 576, D] and, from the ViT's feature layer (the one whose output the
    projector reads), the [CLS] query [1, H, d], the keys [1, H, 577, d] and the softmax scale."""
    core, config = model.model, model.config
    layer = config.vision_feature_layer
    # hidden_states[i] is the output of encoder layer i - 1, so hidden_states[layer] comes from layers[layer - 1]
    # for layer > 0, and from layers[layer] for layer < 0 (-2: the penultimate layer)
    attention = core.vision_tower.encoder.layers[layer if layer < 0 else layer - 1].self_attn
    seen = {}
    hooks = [getattr(attention, name).register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
             for name in ("q_proj", "k_proj")]
    try:
        with torch.no_grad():
            features = core.get_image_features(pixel_values=pixel_values, vision_feature_layer=layer,
                                               vision_feature_select_strategy=config.vision_feature_select_strategy)
    finally:
        for hook in hooks:
            hook.remove()
    cls_query, keys = tk.cls_query_and_keys(seen["q_proj"], seen["k_proj"], attention.num_heads)
    return torch.stack(features.pooler_output), cls_query, keys, attention.scale


def embedding_stage(model, carved: torch.Tensor, keep_idx: torch.Tensor, steps: int, input_ids: torch.Tensor,
                    original_positions: bool = False) -> Outcome:
    """Generate from the prompt a serving engine builds for a carved image: carved [1, T, D] features in T image
    tokens (N - 576 + T tokens), as inputs_embeds, positions 0 .. N' - 1.

    original_positions: a diagnostic, not what vLLM does: each kept token at its original position id (keep_idx
    [1, T], as the in-LLM carve keeps them) and generation continuing at N, to see the renumbering's share apart.
    """
    start, end = image_span(input_ids)
    with torch.no_grad():
        ids = torch.cat([input_ids[:, :start], torch.full((1, carved.shape[1]), LLAVA_IMAGE_TOKEN), input_ids[:, end:]], 1)
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == LLAVA_IMAGE_TOKEN)[..., None], carved.to(embeds.dtype))
    extra = {}
    if original_positions:
        extra["position_ids"] = torch.cat([torch.arange(start), start + keep_idx[0], torch.arange(end, input_ids.shape[1])])[None]
    return generate(model, steps, inputs_embeds=embeds, **extra)


# ------------------------------------------------------------------------------------------------ the evaluation
def evaluate(setup: Setup, log=print) -> list[dict]:
    """One row per (sample, method, budget) with the metrics of METRICS, plus an "another image" row per sample."""
    rows = []
    sample = 0
    for model_seed in setup.model_seeds:
        model = build_model(setup, model_seed)
        for image in range(setup.images):
            pixel_values = synthetic_image(image)
            other_image = synthetic_image(10_000 + image)
            features, cls_query, keys, scale = vision_features(model, pixel_values)
            for prompt in range(setup.prompts):
                start = time.perf_counter()
                input_ids = llava_prompt(prompt)["input_ids"]
                inputs = {"input_ids": input_ids, "pixel_values": pixel_values}
                full = generate(model, setup.steps, **inputs)
                tag = {"model_seed": model_seed, "image": image, "prompt": prompt}
                other = generate(model, setup.steps, input_ids=input_ids, pixel_values=other_image)
                rows.append({**tag, "method": ANOTHER_IMAGE, "stage": "input", "budget": NUM_VISUAL, **compare(full, other)})
                methods = eval_methods.methods(seed=sample)
                for budget in setup.budgets:
                    for name, method in methods.items():
                        outcome, share = in_llm(model, method, budget, setup.steps, inputs)
                        rows.append({**tag, "method": name, "stage": f"LLM layer {CARVE_LAYER}", "budget": budget,
                                     **compare(full, outcome, share)})
                    with torch.no_grad():
                        carved = tk.embedding_carve(features, cls_query, keys, budget, scale=scale)
                        sampled = methods["random"](features, None, budget)
                    for name, (kept, keep_idx), original in ((EMBEDDING_STAGE, carved, False),
                                                             (EMBEDDING_STAGE_ORIGINAL_POSITIONS, carved, True),
                                                             (RANDOM_BEFORE_LLM, sampled, False)):
                        outcome = embedding_stage(model, kept, keep_idx, setup.steps, input_ids, original)
                        rows.append({**tag, "method": name, "stage": "before LLM", "budget": budget,
                                     **compare(full, outcome, eval_methods.spectrum_share(features, kept))})
                sample += 1
                log(f"  sample {sample} (model seed {model_seed}, image {image}, prompt {prompt}): "
                    f"{time.perf_counter() - start:.1f} s")
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation of each metric per (method, stage, budget), in first-seen order; and,
    paired with the in-LLM TokenCarve on the same samples at the same budget, the geometric mean of the KL ratio
    (nan where a KL is 0) and the number of samples with a lower KL."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["stage"], row["budget"]), []).append(row)
    sample = lambda row: (row["model_seed"], row["image"], row["prompt"])  # noqa: E731
    tokencarve_kl = {(sample(row), row["budget"]): row["kl"] for row in rows if row["method"] == "tokencarve"}
    out = []
    for (method, stage, budget), members in groups.items():
        summary = {"method": method, "stage": stage, "budget": budget, "n": len(members)}
        for metric in METRICS:
            values = [m[metric] for m in members]
            if any(math.isnan(v) for v in values):   # a metric without meaning for this row (spectrum of a reference)
                summary[f"{metric}_mean"] = summary[f"{metric}_std"] = math.nan
                continue
            summary[f"{metric}_mean"] = statistics.fmean(values)
            summary[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        pairs = [(m["kl"], tokencarve_kl[sample(m), budget]) for m in members if (sample(m), budget) in tokencarve_kl]
        positive = pairs and all(a > 0 and b > 0 for a, b in pairs)
        summary["kl_ratio_to_tokencarve"] = (math.exp(statistics.fmean(math.log(a / b) for a, b in pairs))
                                             if positive else math.nan)
        summary["kl_below_tokencarve"] = sum(a < b for a, b in pairs) if pairs else math.nan
        out.append(summary)
    return out


def table(summary: list[dict]) -> str:
    """Markdown table, budgets in descending order, the "another image" reference first."""
    def cell(row, metric, digits):
        mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
        return "-" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"

    lines = ["| budget | method | carve point | rel err | KL (nats) | KL / TokenCarve's | lower KL than TokenCarve | "
             "top-1 agree | prefix agree | spectrum share |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ordered = sorted(summary, key=lambda r: (r["method"] != ANOTHER_IMAGE, -r["budget"]))
    for row in ordered:
        n = row["n"]
        budget = "576 (full model, other image)" if row["method"] == ANOTHER_IMAGE else f"{row['budget']} / {NUM_VISUAL}"
        ratio = "-" if math.isnan(row["kl_ratio_to_tokencarve"]) else f"{row['kl_ratio_to_tokencarve']:.2f}x"
        below = "-" if row["method"] == "tokencarve" or math.isnan(row["kl_below_tokencarve"]) else f"{row['kl_below_tokencarve']}/{n}"
        lines.append(f"| {budget} | {row['method']} | {row['stage']} | {cell(row, 'rel_err', 3)} | {cell(row, 'kl', 3)} | "
                     f"{ratio} | {below} | {round(row['top1_mean'] * n)}/{n} | {cell(row, 'prefix', 2)} | "
                     f"{cell(row, 'spectrum', 3)} |")
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict], extra: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + list(extra))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **extra})


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argument_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="a tiny model and one sample (seconds)")
    parser.add_argument("--csv", default=os.path.join(OUT_DIR, "eval_fidelity.csv"),
                        help="summary CSV (per-sample rows go beside it, *_samples.csv)")
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else STANDARD
    samples = len(setup.model_seeds) * setup.images * setup.prompts
    print(f"Model: {setup.describe()}.\nRANDOM WEIGHTS: no real multimodal weights are available offline here; the numbers "
          f"say how much each method perturbs this network's output, not task accuracy.\n{samples} samples "
          f"({len(setup.model_seeds)} model seeds x {setup.images} images x {setup.prompts} prompts), greedy continuation of "
          f"{setup.steps} tokens, mean ± sample std; {device_name('cpu')}")
    start = time.perf_counter()
    rows = evaluate(setup)
    summary = summarise(rows)
    elapsed = time.perf_counter() - start
    print()
    print(table(summary))
    print(f"\n{elapsed:.1f} s in all")
    from transformers import __version__ as transformers_version

    extra = {"model": setup.describe(), "git_sha": git_sha(), "transformers": transformers_version, **versions()}
    write_csv(args.csv, summary, extra)
    write_csv(os.path.splitext(args.csv)[0] + "_samples.csv", rows, extra)
    print(f"wrote {args.csv}")
    return summary


if __name__ == "__main__":
    main()
