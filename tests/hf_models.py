"""Tiny random-weight multimodal models from configs, and their inputs as tensors (no processor, no download).

Each factory returns (model, batch-maker): the model in float32 and eval mode, built from a seed; the
batch-maker turns a list of prompts into the keyword arguments of `model(...)` / `model.generate(...)`.
A prompt is a list of items: an int count of random text tokens, or "image" (or ("image", size) for models
whose token count depends on the image size), laid out in that order.

Weights are drawn at std 0.2 instead of the configs' 0.02: at 0.02 to 0.1 a tiny model's greedy decoding
falls into one- or two-token loops whatever the input, and a test comparing generations could not fail.
"""

import torch

TEXT_DIM, TEXT_LAYERS, HEADS, KV_HEADS, VOCAB = 64, 4, 4, 2, 160
IMAGE_TOKEN, PAD_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 3, 0, 4, 5, 6
FIRST_WORD = 8  # text tokens are drawn from [FIRST_WORD, VOCAB)
# every tiny text model's shape; the models the tests run (not the refused ones) also get positions and special tokens
_TEXT_SHAPE = dict(hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM, num_hidden_layers=TEXT_LAYERS,
                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB)
_TEXT_RUN = dict(_TEXT_SHAPE, max_position_embeddings=512, pad_token_id=PAD_TOKEN, bos_token_id=1, eos_token_id=2)


def _finish(model, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.float().eval()


def _text_config(family: str, **extra):
    from transformers import LlamaConfig, MistralConfig

    common = {**_TEXT_RUN, **extra}
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**{"sliding_window": None, **common})
    raise ValueError(f"text family {family!r}")


def _text_tokens(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(FIRST_WORD, VOCAB, (n,), generator=gen).tolist()


def _token_rows(prompts: list[list], gen: torch.Generator, image_tokens) -> list[list[int]]:
    """[BOS] + each prompt's items in order: an int n is n random words, any other item image_tokens(item)."""
    rows = []
    for prompt in prompts:
        row = [1]
        for item in prompt:
            row += _text_tokens(gen, item) if isinstance(item, int) else image_tokens(item)
        rows.append(row)
    return rows


def _pad(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> input_ids [B, N], attention_mask [B, N] (padded on `side`)."""
    n = max(map(len, rows))
    ids = torch.full((len(rows), n), PAD_TOKEN, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(n - len(row), n) if side == "left" else slice(0, len(row))
        ids[b, span] = torch.tensor(row)
        mask[b, span] = 1
    return ids, mask


# --------------------------------------------------------------------------------------- LLaVA-1.5 layout
LLAVA_IMAGE, LLAVA_PATCH = 32, 8   # 4 x 4 = 16 visual tokens per image


def _clip_vision(image_size: int):
    """The tiny CLIP ViT of both LLaVA families: image_size px square, LLAVA_PATCH px patches."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=image_size, patch_size=LLAVA_PATCH, projection_dim=32)


def tiny_llava(text: str = "llama", attn: str = "sdpa", seed: int = 0, layers: int = TEXT_LAYERS, **text_extra):
    """LlavaForConditionalGeneration: CLIP ViT (16 patches, [CLS] dropped) + 2-layer projector + Llama/Mistral
    (text_extra: more text-config fields, e.g. Mistral's sliding_window)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=_clip_vision(LLAVA_IMAGE), text_config=_text_config(text, num_hidden_layers=layers, **text_extra),
                         image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=16)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return _finish(LlavaForConditionalGeneration(config), seed)


def llava_inputs(prompts: list[list], seed: int = 0, side: str = "left") -> dict:
    """LLaVA-1.5: each "image" is 16 image tokens and one 3 x 32 x 32 picture."""
    gen = torch.Generator().manual_seed(seed)
    images = []

    def image(item) -> list[int]:
        images.append(torch.randn(3, LLAVA_IMAGE, LLAVA_IMAGE, generator=gen))
        return [IMAGE_TOKEN] * (LLAVA_IMAGE // LLAVA_PATCH) ** 2

    ids, mask = _pad(_token_rows(prompts, gen, image), side)
    out = {"input_ids": ids, "attention_mask": mask}
    if images:
        out["pixel_values"] = torch.stack(images)
    return out


# --------------------------------------------------------------------------------------- LLaVA-NeXT
NEXT_TILE = 32                       # tiles of 32 x 32 px, 4 x 4 patches each
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def tiny_llava_next(attn: str = "sdpa", seed: int = 0):
    """LlavaNextForConditionalGeneration: anyres tiles, so an image's token count depends on its size."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(vision_config=_clip_vision(NEXT_TILE), text_config=_text_config("llama"), image_token_index=IMAGE_TOKEN,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=NEXT_PINPOINTS, image_seq_length=16)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return _finish(LlavaNextForConditionalGeneration(config), seed)


def llava_next_inputs(model, prompts: list[list], seed: int = 0, side: str = "left") -> dict:
    """Each ("image", (h, w)) is a picture of that size, cut into a base tile plus its anyres grid (5 tiles,
    zero-padded); its token count (base 16 + unpadded grid + one newline per row) is read from the model."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [item[1] for prompt in prompts for item in prompt if isinstance(item, tuple)]
    pixel_values = torch.randn(len(sizes), 5, 3, NEXT_TILE, NEXT_TILE, generator=gen) if sizes else None
    image_sizes = torch.tensor(sizes, dtype=torch.long) if sizes else None
    counts = []
    if sizes:
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output
        counts = [f.shape[0] for f in features]
    image_counts = iter(counts)
    ids, mask = _pad(_token_rows(prompts, gen, lambda item: [IMAGE_TOKEN] * next(image_counts)), side)
    out = {"input_ids": ids, "attention_mask": mask}
    if sizes:
        out.update(pixel_values=pixel_values, image_sizes=image_sizes)
    return out


# --------------------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 14, 2, 2


def tiny_qwen2_vl(version: str = "2", attn: str = "sdpa", seed: int = 0):
    """Qwen2VLForConditionalGeneration ("2") or Qwen2_5_VLForConditionalGeneration ("2.5"): 3-D multimodal RoPE."""
    text = dict(_TEXT_RUN, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, num_heads=2, in_channels=3, patch_size=QWEN_PATCH,
                  spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL)
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision.update(embed_dim=32, hidden_size=TEXT_DIM)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen2VLForConditionalGeneration
    elif version == "2.5":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision.update(intermediate_size=64, out_hidden_size=TEXT_DIM, window_size=56, fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"Qwen-VL version {version!r}")
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return _finish(cls(config), seed)


def qwen_vl_inputs(prompts: list[list], seed: int = 0, side: str = "left") -> dict:
    """Each ("image", (gh, gw)) is a picture of gh x gw patches of 14 px: gh * gw / 4 visual tokens between
    <vision_start> and <vision_end>; each ("video", (t, gh, gw)) a clip of t temporal patches (2 frames each):
    t * gh * gw / 4 video tokens between the same markers. pixel_values(_videos) are the flattened patches, as
    the processor emits them."""
    gen = torch.Generator().manual_seed(seed)
    rows, types = [], []
    media = {"image": ([], []), "video": ([], [])}   # kind -> (patches, grids)
    for prompt in prompts:
        row, kind = [1], [0]
        for item in prompt:
            if isinstance(item, tuple):
                grid = (1, *item[1]) if item[0] == "image" else tuple(item[1])
                token, token_type = (IMAGE_TOKEN, 1) if item[0] == "image" else (VIDEO_TOKEN, 2)
                n = grid[0] * grid[1] * grid[2] // QWEN_MERGE**2
                row += [VISION_START] + [token] * n + [VISION_END]
                kind += [0] + [token_type] * n + [0]
                patches, grids = media[item[0]]
                grids.append(list(grid))
                patches.append(torch.randn(grid[0] * grid[1] * grid[2], 3 * QWEN_TEMPORAL * QWEN_PATCH**2, generator=gen))
            else:
                row += _text_tokens(gen, item)
                kind += [0] * item
        rows.append(row)
        types.append(kind)
    ids, mask = _pad(rows, side)
    token_types, _ = _pad(types, side)
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": token_types}
    for name, values, grid_name in (("image", "pixel_values", "image_grid_thw"),
                                    ("video", "pixel_values_videos", "video_grid_thw")):
        patches, grids = media[name]
        if grids:
            out.update({values: torch.cat(patches), grid_name: torch.tensor(grids, dtype=torch.long)})
    return out


# --------------------------------------------------------------------------------------- refused families
def tiny_refused(name: str):
    """A family apply_tokencarve refuses, from a tiny config: "llava-onevision", "qwen3-vl", "gemma3", "idefics2"
    or "idefics3" (untrained weights: only the class and config matter to the refusal)."""
    import transformers as tr

    text = dict(_TEXT_SHAPE, num_hidden_layers=2)
    siglip = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=LLAVA_IMAGE, patch_size=LLAVA_PATCH)
    idefics_vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=LLAVA_IMAGE, patch_size=LLAVA_PATCH)
    if name == "llava-onevision":
        config = tr.LlavaOnevisionConfig(vision_config=siglip, text_config=dict(model_type="qwen2", **text),
                                         image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN)
        cls = tr.LlavaOnevisionForConditionalGeneration
    elif name == "qwen3-vl":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_DIM,
                      num_position_embeddings=16, deepstack_visual_indexes=[0])
        config = tr.Qwen3VLConfig(text_config=dict(head_dim=16, rope_parameters=rope, **text), vision_config=vision,
                                  image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                                  vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
        cls = tr.Qwen3VLForConditionalGeneration
    elif name == "gemma3":
        config = tr.Gemma3Config(text_config=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, **text),
                                 vision_config=siglip, mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN,
                                 boi_token_index=VISION_START, eoi_token_index=VISION_END)
        cls = tr.Gemma3ForConditionalGeneration
    elif name == "idefics2":
        perceiver = dict(hidden_size=TEXT_DIM, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                         resampler_head_dim=16, num_key_value_heads=1)
        config = tr.Idefics2Config(vision_config=idefics_vision, perceiver_config=perceiver,
                                   text_config=dict(model_type="mistral", **text), image_token_id=IMAGE_TOKEN)
        cls = tr.Idefics2ForConditionalGeneration
    elif name == "idefics3":
        config = tr.Idefics3Config(vision_config=idefics_vision, text_config=dict(model_type="llama", **text),
                                   image_token_id=IMAGE_TOKEN)
        cls = tr.Idefics3ForConditionalGeneration
    else:
        raise ValueError(f"refused family {name!r}")
    torch.manual_seed(0)
    return cls(config).float().eval()
