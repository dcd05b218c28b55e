"""TokenCarve inside transformers models (tokencarve_kernels.integrations.hf), on tiny random-weight models.

Every test builds its model from a config (tests/hf_models.py): nothing is downloaded.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import python_ref  # noqa: E402
from tests import hf_models as hm  # noqa: E402
from tokencarve_kernels.integrations.hf import _cache_kwarg, _cache_of, apply_tokencarve  # noqa: E402

LAYER = 2
NEW_TOKENS = 20


# ------------------------------------------------------------------------------------------------ set-up
def _llava(text="llama", attn="sdpa"):
    model = hm.tiny_llava(text, attn)
    return model, lambda prompts, **kw: hm.llava_inputs([[p if p != "img" else "image" for p in pr] for pr in prompts], **kw)


def _llava_next(attn="sdpa"):
    model = hm.tiny_llava_next(attn)
    sizes = iter([(64, 32), (32, 64), (64, 64), (32, 32)] * 4)
    return model, lambda prompts, **kw: hm.llava_next_inputs(
        model, [[("image", next(sizes)) if p == "img" else p for p in pr] for pr in prompts], **kw)


def _qwen(version, attn="sdpa"):
    model = hm.tiny_qwen2_vl(version, attn)
    grids = iter([(8, 8), (4, 8), (8, 4), (6, 6)] * 4)
    return model, lambda prompts, **kw: hm.qwen_vl_inputs(
        [[("image", next(grids)) if p == "img" else p for p in pr] for pr in prompts], **kw)


FAMILIES = {
    "llava-llama": lambda attn="sdpa": _llava("llama", attn),
    "llava-mistral": lambda attn="sdpa": _llava("mistral", attn),
    "llava-next": _llava_next,
    "qwen2-vl": lambda attn="sdpa": _qwen("2", attn),
    "qwen2.5-vl": lambda attn="sdpa": _qwen("2.5", attn),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    model, make = FAMILIES[request.param]()
    return request.param, model, make


def _generate(model, inputs, n=NEW_TOKENS):
    """Greedy, exactly n tokens (EOS off), only the new tokens."""
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=hm.PAD_TOKEN)
    return out[:, inputs["input_ids"].shape[1]:]


def _image_lengths(inputs):
    """Visual tokens of each sample (all its images together)."""
    return (inputs["input_ids"] == hm.IMAGE_TOKEN).sum(dim=1).tolist()


def _text_model(model):
    return model.model.language_model


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# ------------------------------------------------------------------------------------------------ keep-all
def test_keep_all_is_the_unpatched_model_and_remove_restores_it(family):
    name, model, make = family
    inputs = make([[4, "img", 6], [2, "img", 3, "img", 5]])
    attn_config = _text_model(model).layers[LAYER - 1].self_attn.config
    registered = set(transformers.AttentionInterface._global_mapping)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_tokens = _generate(model, inputs, n=8)
    hooks = _hook_count(model)   # after a first run: transformers adds its own output-capturing hooks lazily
    with apply_tokencarve(model, budget=10_000, layer=LAYER) as handle:
        with torch.no_grad():
            out = model(**inputs).logits
        tokens = _generate(model, inputs, n=8)
        assert handle.kept_positions is not None and handle.kept_positions.shape == inputs["input_ids"].shape
    torch.testing.assert_close(out, ref)
    assert torch.equal(tokens, ref_tokens)
    # removed: hooks, attention entry, config and method wrapper gone; bit-identical behaviour
    assert _hook_count(model) == hooks
    assert _text_model(model).layers[LAYER - 1].self_attn.config is attn_config
    assert set(transformers.AttentionInterface._global_mapping) == registered
    assert "get_image_features" not in vars(model.model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


# ------------------------------------------------------------------------------------------------ budget T
def test_cache_holds_carved_prompt_and_generation_runs(family):
    name, model, make = family
    inputs = make([[3, "img", 4]])
    _check_carved_cache(model, inputs, budget=5)


def test_budget_one_in_bfloat16():
    model, make = FAMILIES["llava-llama"]()
    inputs = make([[3, "img", 4]])
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    _check_carved_cache(model.bfloat16(), inputs, budget=1)


def _check_carved_cache(model, inputs, budget):
    """Prefill keeps N - Nv + T entries in every cache layer; 20 tokens generate from it."""
    n = inputs["input_ids"].shape[1]
    nv = _image_lengths(inputs)[0]
    with apply_tokencarve(model, budget=budget, layer=LAYER) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache = _cache_of(out)
        assert out.logits.shape[1] == n - nv + budget
        assert [entry.keys.shape[-2] for entry in cache.layers] == [n - nv + budget] * len(cache.layers)
        assert handle.kept_positions.shape == (1, n - nv + budget)
        tokens = _generate(model, inputs)
    assert tokens.shape == (1, NEW_TOKENS)


def test_kept_tokens_keep_their_positions_in_prefill_and_decode(family):
    """The rotary embeddings every layer from `layer` on sees, at prefill and at each decode step, are the
    unpatched model's at the kept tokens' original positions (3-D for Qwen2-VL)."""
    name, model, make = family
    inputs = make([[3, "img", 4], [5, "img", 2]], side="left")
    lm = _text_model(model)
    seen = []
    hook = lm.layers[LAYER].self_attn.register_forward_pre_hook(   # what the layer's attention receives
        lambda m, a, kw: seen.append((kw["position_embeddings"][0].clone(), kw.get("position_ids"))), with_kwargs=True)
    try:
        _generate(model, inputs, n=4)
        ref, seen[:] = list(seen), []
        with apply_tokencarve(model, budget=3, layer=LAYER) as handle:
            _generate(model, inputs, n=4)
            kept = handle.kept_positions
    finally:
        hook.remove()
    assert len(seen) == len(ref) == 4
    # prefill: row j of the carved sequence holds original position kept[b, j] (-1: padding slot)
    valid = kept >= 0
    cos_ref = ref[0][0].expand(kept.shape[0], -1, -1)
    expected = torch.gather(cos_ref, 1, kept.clamp(min=0)[..., None].expand(-1, -1, cos_ref.shape[-1]))
    torch.testing.assert_close(seen[0][0][valid], expected[valid], rtol=0, atol=0)
    if ref[0][1] is not None:
        assert torch.equal(seen[0][1].expand_as(kept)[valid], torch.gather(ref[0][1].expand(kept.shape[0], -1), 1, kept.clamp(min=0))[valid])
    # decode: generated tokens continue the original numbering
    for (cos, pos), (cos0, pos0) in zip(seen[1:], ref[1:]):
        assert torch.equal(cos, cos0)
        assert (pos is None) == (pos0 is None) and (pos is None or torch.equal(pos, pos0))


# ------------------------------------------------------------------------------------------------ by hand
@pytest.mark.parametrize("name", ["llava-llama", "qwen2-vl"])
def test_equals_layers_run_by_hand_around_python_ref_carve(name):
    """Layers 0..layer-1 run by hand, python_ref.carve on their output scored by an eager model's attention
    matrix, the other layers run by hand on the carved sequence: the patched model's logits."""
    budget = 4
    model, make = FAMILIES[name]()
    eager, _ = FAMILIES[name]("eager")
    inputs = make([[3, "img", 2, "img", 4]])
    lm = _text_model(model)
    captured = {}
    hook = lm.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    with torch.no_grad():
        eager_out = eager(**inputs, output_attentions=True)
        model(**inputs)
    hook.remove()
    h = captured["inputs_embeds"]
    n = h.shape[1]
    pos = captured.get("position_ids")
    pos = torch.arange(n)[None] if pos is None else pos[-3:] if pos.dim() == 3 else pos
    with torch.no_grad():
        for layer in lm.layers[:LAYER]:
            h = layer(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos))
        attn = eager_out.attentions[LAYER - 1][:, :, -1, :].mean(dim=1)    # [1, N], the authors' route
        keep_pos, pieces, start = [], [], 0
        for first, nv in _image_runs(inputs["input_ids"][0]):
            carved, keep = python_ref.carve(h[:, first : first + nv].double(), attn[:, first : first + nv].double(), budget)
            pieces += [h[0, start:first], carved[0].float()]
            keep_pos += list(range(start, first)) + (first + keep[0]).tolist()
            start = first + nv
        pieces.append(h[0, start:])
        keep_pos += list(range(start, n))
        keep_pos = torch.tensor(keep_pos)
        h = torch.cat(pieces)[None]
        carved_pos = pos[..., keep_pos]
        for layer in lm.layers[LAYER:]:
            h = layer(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, carved_pos))
        by_hand = model.lm_head(lm.norm(h))
        with apply_tokencarve(model, budget=budget, layer=LAYER) as handle:
            patched = model(**inputs).logits
    assert torch.equal(handle.kept_positions[0], keep_pos)
    torch.testing.assert_close(patched, by_hand, rtol=1e-4, atol=1e-4)


def _image_runs(ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of image tokens in one prompt (the prompts here never put two images side by side)."""
    runs, j, row = [], 0, (ids == hm.IMAGE_TOKEN).tolist()
    while j < len(row):
        if row[j]:
            end = j
            while end < len(row) and row[end]:
                end += 1
            runs.append((j, end - j))
            j = end
        else:
            j += 1
    return runs


# ------------------------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("name", ["llava-llama", "llava-next", "qwen2-vl"])
def test_batch_generates_what_single_runs_generate(name):
    model, make = FAMILIES[name]()
    prompts = [[2, "img", 9], [6, "img", 1, "img", 3], [1, "img", 4]]   # different lengths and image counts
    batch = make(prompts, seed=1, side="left")
    with apply_tokencarve(model, budget=3, layer=LAYER):
        together = _generate(model, batch, n=8)
        alone = [_generate(model, _single(batch, b), n=8) for b in range(len(prompts))]
    for b, tokens in enumerate(alone):
        assert torch.equal(together[b], tokens[0]), f"sample {b}"


def _single(batch: dict, b: int) -> dict:
    """Sample b of a left-padded batch as a prompt of its own (padding dropped, its own images only)."""
    keep = batch["attention_mask"][b].bool()
    out = {"input_ids": batch["input_ids"][b, keep][None], "attention_mask": batch["attention_mask"][b, keep][None]}
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = batch["mm_token_type_ids"][b, keep][None]
    images_before = sum(_count_images(batch, i) for i in range(b))
    mine = _count_images(batch, b)
    if mine == 0:
        return out
    if "image_grid_thw" in batch:
        grids = batch["image_grid_thw"]
        patches = grids.prod(dim=1).tolist()
        first = sum(patches[:images_before])
        out["pixel_values"] = batch["pixel_values"][first : first + sum(patches[images_before : images_before + mine])]
        out["image_grid_thw"] = grids[images_before : images_before + mine]
    else:
        out["pixel_values"] = batch["pixel_values"][images_before : images_before + mine]
        if "image_sizes" in batch:
            out["image_sizes"] = batch["image_sizes"][images_before : images_before + mine]
    return out


def _count_images(batch: dict, b: int) -> int:
    ids = batch["input_ids"][b]
    if "image_grid_thw" in batch or "image_sizes" in batch:
        return len(_image_runs(ids))
    return int((ids == hm.IMAGE_TOKEN).sum()) // 16   # LLaVA-1.5: adjacent images share a run


def test_batch_with_a_text_only_prompt_generates_what_single_runs_generate():
    """LLaVA-1.5: a prompt without images between two with images; its row is the unpatched model's."""
    model, make = FAMILIES["llava-llama"]()
    prompts = [[2, "img", 9], [7], [1, "img", 4]]
    batch = make(prompts, seed=1, side="left")
    n = batch["input_ids"].shape[1]
    valid = batch["attention_mask"][1].bool()
    with torch.no_grad():
        ref = model(**batch).logits[1, valid]
    with apply_tokencarve(model, budget=3, layer=LAYER) as handle:
        with torch.no_grad():
            logits = model(**batch).logits
        kept = handle.kept_positions
        together = _generate(model, batch, n=8)
        alone = [_generate(model, _single(batch, b), n=8) for b in range(len(prompts))]
    assert "pixel_values" not in _single(batch, 1)
    # the text-only row holds every position of its prompt, in order, and the other two were carved
    assert kept.shape[1] == n and torch.equal(kept[1], torch.arange(n))
    kept_tokens = torch.where(kept >= 0, batch["input_ids"].gather(1, kept.clamp(min=0)), -1)
    assert ((kept_tokens == hm.IMAGE_TOKEN).sum(dim=1) == torch.tensor([3, 0, 3])).all()
    torch.testing.assert_close(logits[1, valid], ref, rtol=1e-5, atol=1e-5)
    for b, tokens in enumerate(alone):
        assert torch.equal(together[b], tokens[0]), f"sample {b}"


@pytest.mark.parametrize("name", ["llava-llama", "qwen2-vl"])
def test_right_padding_scores_each_sample_by_its_last_valid_token(name):
    model, make = FAMILIES[name]()
    batch = make([[2, "img", 9], [1, "img", 3], [5, "img", 1]], seed=2, side="right")
    with apply_tokencarve(model, budget=4, layer=LAYER) as handle, torch.no_grad():
        logits = model(**batch).logits
        kept = handle.kept_positions
        for b in range(3):
            single = _single(batch, b)
            alone = model(**single).logits[0, -1]
            last = int(batch["attention_mask"][b].sum()) - 1
            row = (kept[b] == last).nonzero().item()
            torch.testing.assert_close(logits[b, row], alone, rtol=1e-4, atol=1e-4)
            mine = kept[b, : row + 1]
            assert torch.equal(mine[mine >= 0], handle.kept_positions[0])


@pytest.mark.parametrize("name", ["llava-llama", "qwen2-vl"])
def test_manual_decode_loop_matches_generate(name):
    """A hand-written greedy loop (no position ids, no mask after the prompt) decodes what generate() does."""
    model, make = FAMILIES[name]()
    inputs = make([[3, "img", 5]], seed=3)
    with apply_tokencarve(model, budget=4, layer=LAYER), torch.no_grad():
        expected = _generate(model, inputs, n=6)
        out = model(**inputs, use_cache=True)
        tokens = [out.logits[:, -1].argmax(-1)]
        cache = _cache_of(out)
        for _ in range(5):
            out = model(input_ids=tokens[-1][:, None], use_cache=True, **{_cache_kwarg(model): cache})
            tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(torch.stack(tokens, dim=1), expected)


# ------------------------------------------------------------------------------------------------ attention
class _SquareMatrices(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op output whose last two dims are both a sequence length (an attention matrix)."""

    def __init__(self, lengths):
        super().__init__()
        self.lengths, self.found = set(lengths), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and {t.shape[-1], t.shape[-2]} <= self.lengths:
                self.found.append((str(func), tuple(t.shape)))
        return out


def _square_matrices(model, inputs, lengths):
    lm = _text_model(model)
    mode = _SquareMatrices(lengths)
    hooks = [lm.register_forward_pre_hook(lambda *a: [mode.__enter__()] and None),
             lm.register_forward_hook(lambda *a: mode.__exit__(None, None, None))]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for hook in hooks:
            hook.remove()
    return logits, mode.found


@pytest.mark.parametrize("name", ["llava-llama", "qwen2-vl"])
def test_sdpa_stays_on_and_eager_gives_the_same_result(name):
    model, make = FAMILIES[name]()
    eager, _ = FAMILIES[name]("eager")
    inputs = make([[3, "img", 5]], seed=4)
    n = inputs["input_ids"].shape[1]
    with apply_tokencarve(model, budget=4, layer=LAYER) as handle:
        assert model.config.text_config._attn_implementation == "sdpa"
        logits, found = _square_matrices(model, inputs, {n, n - _image_lengths(inputs)[0] + 4})
        kept = handle.kept_positions
    assert found == [], f"N x N matrices under SDPA: {found[:3]}"
    with apply_tokencarve(eager, budget=4, layer=LAYER) as handle:
        eager_logits, eager_found = _square_matrices(eager, inputs, {n, kept.shape[1]})
        assert torch.equal(handle.kept_positions, kept)
    assert eager_found, "the detector sees eager attention's N x N matrices"
    torch.testing.assert_close(eager_logits, logits, rtol=1e-4, atol=1e-4)


def test_the_original_attention_implementation_sees_its_own_config():
    """Implementations such as FlashAttention read module.config._attn_implementation to pick their kernel: the
    wrapped call at layer-1 must show them the model's own name, not the capture entry's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = "tokencarve_test_fa_like"
    seen = []

    def fa_like(module, *args, **kwargs):
        seen.append(module.config._attn_implementation)
        return sdpa_attention_forward(module, *args, **kwargs)

    transformers.AttentionInterface.register(name, fa_like)
    AttentionMaskInterface.register(name, sdpa_mask)
    try:
        model, make = FAMILIES["llava-llama"]()
        inputs = make([[3, "img", 5]], seed=7)
        with apply_tokencarve(model, budget=4, layer=LAYER), torch.no_grad():
            expected = model(**inputs).logits
        model.config.text_config._attn_implementation = name   # the text model's modules share this config
        with apply_tokencarve(model, budget=4, layer=LAYER), torch.no_grad():
            logits = model(**inputs).logits
    finally:
        transformers.AttentionInterface._global_mapping.pop(name)
        AttentionMaskInterface._global_mapping.pop(name)
    assert seen == [name] * model.config.text_config.num_hidden_layers
    torch.testing.assert_close(logits, expected)


# ------------------------------------------------------------------------------------------------ varlen, carve_fn
def test_llava_next_images_of_different_sizes_carve_by_ratio():
    model, make = FAMILIES["llava-next"]()
    inputs = make([[2, "img", 3, "img", 4]], seed=5)
    runs = _image_runs(inputs["input_ids"][0])
    assert len({length for _, length in runs}) == 2
    kept = [max(1, int(0.25 * length + 0.5)) for _, length in runs]
    with apply_tokencarve(model, ratio=0.25, layer=LAYER) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
    n = inputs["input_ids"].shape[1]
    expected = n - sum(length for _, length in runs) + sum(kept)
    assert [entry.keys.shape[-2] for entry in _cache_of(out).layers] == [expected] * len(_cache_of(out).layers)
    for (start, length), t in zip(runs, kept):
        inside = (handle.kept_positions[0] >= start) & (handle.kept_positions[0] < start + length)
        assert int(inside.sum()) == t


def test_carve_fn_replaces_tokencarve():
    """carve_fn gets each group of equal-size images with its attention row and decides what is kept."""
    model, make = FAMILIES["llava-next"]()
    inputs = make([[2, "img", 3, "img", 4, "img"]], seed=6)
    calls = []

    def first_tokens(hidden, attn, budget):
        calls.append((tuple(hidden.shape), tuple(attn.shape), attn.dtype, budget, float(attn.sum())))
        keep = torch.arange(budget).expand(hidden.shape[0], -1)
        return hidden[:, :budget], keep

    runs = _image_runs(inputs["input_ids"][0])
    with apply_tokencarve(model, budget=3, layer=LAYER, carve_fn=first_tokens) as handle, torch.no_grad():
        model(**inputs)
    sizes = sorted(length for _, length in runs)
    assert sum(shape[0] for shape, *_ in calls) == len(runs)
    assert sorted(shape[1] for shape, *_ in calls for _ in range(shape[0])) == sizes
    assert all(a_shape == shape[:2] and dtype == torch.float32 and budget == 3 and 0 < total < shape[0]
               for shape, a_shape, dtype, budget, total in calls)
    expected = []
    start = 0
    for first, length in runs:
        expected += list(range(start, first)) + [first, first + 1, first + 2]
        start = first + length
    expected += list(range(start, inputs["input_ids"].shape[1]))
    assert handle.kept_positions[0].tolist() == expected

    def wrong(hidden, attn, budget):
        return hidden[:, : budget + 1], torch.arange(budget)[None]

    with apply_tokencarve(model, budget=3, layer=LAYER, carve_fn=wrong), pytest.raises(ValueError, match="carve_fn must return"):
        model(**inputs)


# ------------------------------------------------------------------------------------------------ bad use
def test_bad_use_gets_clear_errors():
    model, make = FAMILIES["llava-llama"]()
    with pytest.raises(NotImplementedError, match="model must be one of"):
        apply_tokencarve(model.model.language_model)
    with pytest.raises(NotImplementedError, match="model must be one of"):
        apply_tokencarve(transformers.LlamaForCausalLM(model.config.text_config))
    with pytest.raises(ValueError, match=r"layer must be an int in \[1, 3\]"):
        apply_tokencarve(model, layer=0)
    with pytest.raises(ValueError, match=r"layer must be an int in \[1, 3\]"):
        apply_tokencarve(model, layer=4)
    with pytest.raises(ValueError, match="budget must be an int >= 1"):
        apply_tokencarve(model, budget=0)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        apply_tokencarve(model, ratio=0.0)
    with pytest.raises(ValueError, match="merge must be one of"):
        apply_tokencarve(model, merge="max")
    with pytest.raises(ValueError, match="attn_weight must be in"):
        apply_tokencarve(model, attn_weight=1.5)
    with apply_tokencarve(model, budget=4):
        with pytest.raises(ValueError, match="already patched"):
            apply_tokencarve(model)
        inputs = make([[3, "img", 5]])
        with pytest.raises(ValueError, match="labels"):
            model(**inputs, labels=inputs["input_ids"])
        static = transformers.StaticCache(config=model.config, max_cache_len=64)
        with pytest.raises(NotImplementedError, match="needs a DynamicCache"), torch.no_grad():
            model(**inputs, use_cache=True, **{_cache_kwarg(model): static})


def test_prompt_without_image_tokens_passes_through():
    model, make = FAMILIES["llava-llama"]()
    inputs = make([[7], [4]], side="left")
    with torch.no_grad():
        ref = model(**inputs).logits
        with apply_tokencarve(model, budget=4) as handle:
            out = model(**inputs).logits
    assert torch.equal(out, ref) and handle.kept_positions is None


@pytest.mark.parametrize("name", ["llava-onevision", "qwen3-vl", "gemma3", "idefics2", "idefics3"])
def test_families_not_built_for_are_refused(name):
    """Each needs its own image layout and rope checked: refused by name, nothing left attached."""
    model = hm.tiny_refused(name)
    hooks = _hook_count(model)
    for target in (model, model.model):
        with pytest.raises(NotImplementedError, match=f"got {type(target).__name__} .model_type '{model.config.model_type}'"):
            apply_tokencarve(model=target, budget=4)
    assert _hook_count(model) == hooks and "get_image_features" not in vars(model.model)


def test_quantized_cache_gets_a_clear_error():
    """transformers' fp8 QuantizedCache needs no extra package; its layers keep no [B, H, N, d] keys to gather."""
    model, make = FAMILIES["llava-llama"]()
    inputs = make([[3, "img", 5]])
    try:
        cache = transformers.QuantizedCache("fp8", model.config)
    except ValueError as error:   # before 5.2x only the quanto and hqq backends, each an extra package
        pytest.skip(f"no fp8 QuantizedCache in transformers {transformers.__version__}: {error}")
    with apply_tokencarve(model, budget=4), torch.no_grad():
        with pytest.raises(NotImplementedError, match="needs a DynamicCache.*Fp8QuantizedLayer.*quantized"):
            model(**inputs, use_cache=True, **{_cache_kwarg(model): cache})


def test_offloaded_cache_gets_a_clear_error_before_the_forward():
    model, make = FAMILIES["llava-llama"]()
    inputs = make([[3, "img", 5]])
    cache = transformers.DynamicCache(offloading=True)
    with apply_tokencarve(model, budget=4), torch.no_grad():
        with pytest.raises(NotImplementedError, match="offloaded DynamicCache .offloading=True.: offloaded caches are not"):
            model(**inputs, use_cache=True, **{_cache_kwarg(model): cache})
    assert cache.get_seq_length() == 0


def test_prompt_longer_than_the_sliding_window_gets_a_clear_error():
    """Mistral with a 24-token window: a 30-token prompt is refused with or without a cache (without one, the
    layers after the carve would count the window in carved slots); a 21-token prompt carves as usual."""
    model = hm.tiny_llava("mistral", sliding_window=24)
    long, short = hm.llava_inputs([[3, "image", 10]]), hm.llava_inputs([[2, "image", 2]])
    assert long["input_ids"].shape[1] == 30 and short["input_ids"].shape[1] == 21
    with torch.no_grad():
        ref = model(**short).logits
    with torch.no_grad(), apply_tokencarve(model, budget=4):
        for use_cache in (True, False):
            with pytest.raises(NotImplementedError, match="30-token prompt is longer than the text model's sliding window .24"):
                model(**long, use_cache=use_cache)
        with pytest.raises(NotImplementedError, match="sliding window"):
            _generate(model, long, n=2)
        out = model(**short, use_cache=True)
    assert [entry.keys.shape[-2] for entry in _cache_of(out).layers] == [21 - 16 + 4] * hm.TEXT_LAYERS
    with torch.no_grad(), apply_tokencarve(model, budget=16):
        torch.testing.assert_close(model(**short).logits, ref)


def test_multi_token_steps_on_a_carved_cache_are_refused():
    """After a carved prefill, a 2-token step or a new prompt with an image is refused before it touches the cache."""
    model, make = FAMILIES["llava-llama"]()
    inputs = make([[3, "img", 5]])
    carved_length = inputs["input_ids"].shape[1] - 16 + 4
    more = make([[2, "img", 1]], seed=9)
    with apply_tokencarve(model, budget=4), torch.no_grad():
        cache = _cache_of(model(**inputs, use_cache=True))
        for step in ({"input_ids": torch.tensor([[9, 10]])}, {"input_ids": more["input_ids"], "pixel_values": more["pixel_values"]},
                     {"inputs_embeds": model.get_input_embeddings()(torch.tensor([[9, 10, 11]]))}):
            steps = next(iter(step.values())).shape[1]
            with pytest.raises(NotImplementedError, match=f"a carved cache grows one token per step; got a {steps}-token step"):
                model(**step, use_cache=True, **{_cache_kwarg(model): cache})
            assert cache.get_seq_length() == carved_length
        model(input_ids=torch.tensor([[9]]), use_cache=True, **{_cache_kwarg(model): cache})
    assert cache.get_seq_length() == carved_length + 1


def test_prompt_given_as_inputs_embeds_passes_through():
    """Without input_ids there are no image-token positions to read: the unpatched model's outputs."""
    model, make = FAMILIES["llava-llama"]()
    inputs = make([[3, "img", 5], [1, "img", 2]], side="left")
    embeds = dict(inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]).detach(),
                  attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"])
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=hm.PAD_TOKEN)
    with torch.no_grad():
        ref = model(**embeds).logits
    ref_tokens = model.generate(**embeds, **gen)
    with apply_tokencarve(model, budget=4) as handle:
        with torch.no_grad():
            out = model(**embeds).logits
        tokens = model.generate(**embeds, **gen)
        assert handle.kept_positions is None
        with torch.no_grad():   # the same prompt as input_ids is carved
            assert model(**inputs).logits.shape[1] < inputs["input_ids"].shape[1]
    assert torch.equal(out, ref) and torch.equal(tokens, ref_tokens)


def test_prefill_on_a_non_empty_cache_passes_through():
    """A prompt prefilled in two chunks (text, then the image and the rest) is never carved: the image's chunk
    starts from a non-empty cache."""
    model, make = FAMILIES["llava-llama"]()
    inputs = make([[3, "img", 5]])
    n = inputs["input_ids"].shape[1]

    def chunked():
        cache = transformers.DynamicCache()
        with torch.no_grad():
            model(input_ids=inputs["input_ids"][:, :4], use_cache=True, **{_cache_kwarg(model): cache})
            out = model(input_ids=inputs["input_ids"][:, 4:], pixel_values=inputs["pixel_values"],
                        attention_mask=inputs["attention_mask"], use_cache=True, **{_cache_kwarg(model): cache})
        return out.logits, cache.get_seq_length()

    ref, ref_length = chunked()
    with apply_tokencarve(model, budget=4) as handle:
        logits, length = chunked()
        assert handle.kept_positions is None
    assert ref_length == length == n
    assert torch.equal(logits, ref)


def test_qwen2_vl_videos_are_never_carved():
    """A video alone runs as the unpatched model; beside an image, only the image is carved."""
    model = hm.tiny_qwen2_vl("2")
    video = hm.qwen_vl_inputs([[3, ("video", (2, 4, 4)), 4]])
    assert int((video["input_ids"] == hm.VIDEO_TOKEN).sum()) == 8
    with torch.no_grad():
        ref = model(**video).logits
    ref_tokens = _generate(model, video, n=4)
    with apply_tokencarve(model, budget=3) as handle:
        with torch.no_grad():
            out = model(**video).logits
        tokens = _generate(model, video, n=4)
        assert handle.kept_positions is None
        mixed = hm.qwen_vl_inputs([[3, ("image", (4, 8)), 2, ("video", (2, 4, 4)), 4]])
        with torch.no_grad():
            model(**mixed)
        kept = handle.kept_positions[0]
    assert torch.equal(out, ref) and torch.equal(tokens, ref_tokens)
    kept_tokens = mixed["input_ids"][0, kept]
    assert int((kept_tokens == hm.IMAGE_TOKEN).sum()) == 3
    assert torch.equal(kept[kept_tokens == hm.VIDEO_TOKEN], (mixed["input_ids"][0] == hm.VIDEO_TOKEN).nonzero().squeeze(1))


def test_demo_tiny_llava_section(capsys):
    from tokencarve_kernels import demo

    result = demo.tiny_llava_end_to_end(budget=128)
    out = capsys.readouterr().out
    assert result["prompt_tokens"] == 642 and result["kept_visual"] == 128
    assert result["plain"]["cached"] == 642 and result["carved"]["cached"] == 642 - 576 + 128
    assert result["carved"]["kv_bytes"] * 642 == result["plain"]["kv_bytes"] * 194
    assert len(result["plain"]["tokens"]) == len(result["carved"]["tokens"]) == demo.LLAVA_NEW_TOKENS
    assert "without carving" in out and "TokenCarve T=128" in out and "savings: 448 of 642" in out
