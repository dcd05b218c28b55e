"""The vLLM plugin end to end: a tiny random LLaVA-1.5 served by `vllm.LLM` on the CPU.

Three engines, one at a time, each started once for the whole module: vLLM's own LLaVA (no plugin),
the plugin keeping all 576 tokens, and the plugin at budget 64. What the carve saw and returned inside
the worker is read back with `LLM.apply_model`.
"""

import gc
import itertools
import os
import subprocess
import sys

import pytest
import torch
from vllm import LLM, SamplingParams

import python_ref
from tests_vllm.tiny_llava import IMAGE_TOKEN_ID, NUM_PATCHES, make_image

BUDGET = 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
# (prompt, number of images); each image is different (its own seed).
PROMPTS = [
    ("USER: <image>\nWhat is in the image? ASSISTANT:", 1),
    ("USER: <image>\nDescribe this picture. ASSISTANT:", 1),
    ("USER: <image> left and <image> right: what colour is the shape? ASSISTANT:", 2),
]


_RUNS = itertools.count()


def _requests():
    requests, seed = [], 0
    for text, n in PROMPTS:
        requests.append({"prompt": text, "multi_modal_data": {"image": [make_image(seed + i) for i in range(n)]}})
        seed += n
    return requests


def _serve(model_dir, budget=None) -> LLM:
    overrides = None if budget is None else {"architectures": ["TokenCarveLlavaForConditionalGeneration"], "tokencarve_budget": budget}
    return LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
               limit_mm_per_prompt={"image": 2}, hf_overrides=overrides)


def _stop(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def _generate(llm: LLM, requests) -> list[tuple[list[int], list[int]]]:
    """(prompt token ids, greedy output token ids) per request, computed afresh: every call names its
    images anew (multi_modal_uuids), so no encoder, processor or prefix cache entry is reused."""
    run = next(_RUNS)
    for i, request in enumerate(requests):
        images = request["multi_modal_data"]["image"]
        request["multi_modal_uuids"] = {"image": [f"run{run}-request{i}-image{j}" for j in range(len(images))]}
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in llm.generate(requests, GREEDY)]


def _generate_one_by_one(llm: LLM) -> list[tuple[list[int], list[int]]]:
    """`_generate` of PROMPTS one request at a time. vLLM schedules whatever requests have reached its
    engine, so a batch sent at once is split into steps by timing, and its CPU vision encoder is not
    batch invariant: comparisons bit for bit across engines or runs need the same steps."""
    return [_generate(llm, [request])[0] for request in _requests()]


# ---- run inside vLLM's worker through LLM.apply_model ----

def _record_carves(model) -> None:
    """Wrap the plugin's carve call so that each call's inputs and kept indices are kept on the model."""
    import tokencarve_kernels.integrations.vllm_llava as plugin

    carve = plugin.embedding_carve
    model.tokencarve_records = []

    def recording(features, cls_query, keys, budget, **kwargs):
        carved, keep_idx = carve(features, cls_query, keys, budget, **kwargs)
        model.tokencarve_records.append(
            {"features": features.clone(), "cls_query": cls_query.clone(), "keys": keys.clone(), "budget": budget,
             "scale": kwargs["scale"], "carved": carved.clone(), "keep_idx": keep_idx.clone()})
        return carved, keep_idx

    plugin.embedding_carve = recording


def _take_records(model) -> list[dict]:
    records, model.tokencarve_records = model.tokencarve_records, []
    return records


# ---- fixtures: one engine at a time ----

@pytest.fixture(scope="module")
def vllm_outputs(model_dir):
    """vLLM's own LLaVA, no plugin."""
    llm = _serve(model_dir)
    try:
        return _generate_one_by_one(llm)
    finally:
        _stop(llm)


@pytest.fixture(scope="module")
def keep_all_outputs(model_dir):
    llm = _serve(model_dir, budget=NUM_PATCHES)
    try:
        return _generate_one_by_one(llm)
    finally:
        _stop(llm)


@pytest.fixture(scope="module")
def carving_llm(model_dir, vllm_outputs, keep_all_outputs):  # the other engines first: one at a time
    llm = _serve(model_dir, budget=BUDGET)
    llm.apply_model(_record_carves)
    yield llm
    _stop(llm)


@pytest.fixture(scope="module")
def carved_run(carving_llm):
    """Outputs and carve records of the batch of PROMPTS at budget 64."""
    outputs = _generate(carving_llm, _requests())
    (records,) = carving_llm.apply_model(_take_records)
    return outputs, records


# ---- tests ----

def test_keep_all_equals_vllm_without_plugin(vllm_outputs, keep_all_outputs):
    assert keep_all_outputs == vllm_outputs
    for (prompt_ids, _), (_, n) in zip(vllm_outputs, PROMPTS):
        assert prompt_ids.count(IMAGE_TOKEN_ID) == NUM_PATCHES * n


def test_prompt_holds_budget_tokens_per_image(carved_run, vllm_outputs):
    outputs, _ = carved_run
    for (prompt_ids, generated), (full_ids, _), (_, n) in zip(outputs, vllm_outputs, PROMPTS):
        assert len(prompt_ids) == len(full_ids) - n * NUM_PATCHES + n * BUDGET
        assert prompt_ids.count(IMAGE_TOKEN_ID) == n * BUDGET
        assert [t for t in prompt_ids if t != IMAGE_TOKEN_ID] == [t for t in full_ids if t != IMAGE_TOKEN_ID]  # the text is untouched
        assert len(generated) == GREEDY.max_tokens


def test_carve_inside_vllm_matches_python_ref(carved_run):
    _, records = carved_run
    images = 0
    for rec in records:
        assert rec["budget"] == BUDGET and rec["keep_idx"].shape == (rec["features"].shape[0], BUDGET)
        carved, keep_idx = python_ref.embedding_carve(rec["features"], rec["cls_query"], rec["keys"], BUDGET, scale=rec["scale"])
        assert torch.equal(rec["keep_idx"], keep_idx)
        torch.testing.assert_close(rec["carved"], carved, rtol=1e-6, atol=0.0)
        images += rec["features"].shape[0]
    assert images == sum(n for _, n in PROMPTS)  # every image of the batch went through the carve


def test_batch_of_different_images_carves_each_on_its_own(carved_run):
    _, records = carved_run
    features = torch.cat([r["features"] for r in records])
    cls_query = torch.cat([r["cls_query"] for r in records])
    keys = torch.cat([r["keys"] for r in records])
    keep_idx = torch.cat([r["keep_idx"] for r in records])
    assert len({tuple(k.tolist()) for k in keep_idx}) == keep_idx.shape[0]  # different images, different keep sets
    for b in range(features.shape[0]):  # an image's keep set does not depend on the rest of the batch
        _, alone = python_ref.embedding_carve(features[b : b + 1], cls_query[b : b + 1], keys[b : b + 1], BUDGET, scale=records[0]["scale"])
        assert torch.equal(alone[0], keep_idx[b])


def test_greedy_outputs_identical_across_runs(carving_llm):
    """Two runs of the same requests give the same tokens and the same carve, bit for bit."""
    runs = []
    for _ in range(2):
        outputs = _generate_one_by_one(carving_llm)
        (records,) = carving_llm.apply_model(_take_records)
        runs.append((outputs, records))
    (first_outputs, first_records), (outputs, records) = runs
    assert outputs == first_outputs
    assert len(records) == len(first_records) == len(PROMPTS)  # the carve ran again: no cache hit
    for a, b in zip(records, first_records):
        assert torch.equal(a["features"], b["features"]) and torch.equal(a["cls_query"], b["cls_query"])
        assert torch.equal(a["keep_idx"], b["keep_idx"]) and torch.equal(a["carved"], b["carved"])


def test_carve_reads_the_feature_layer_of_the_vision_tower(carving_llm, model_dir):
    """The features and the [CLS] query / keys the plugin carves with are those of transformers' LLaVA."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    image = make_image(100)
    _generate(carving_llm, [{"prompt": PROMPTS[0][0], "multi_modal_data": {"image": [image]}}])
    ((record,),) = [carving_llm.apply_model(_take_records)[0]]

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    pixel_values = AutoProcessor.from_pretrained(model_dir)(images=image, text="<image>", return_tensors="pt")["pixel_values"]
    layer = model.model.vision_tower.encoder.layers[model.config.vision_feature_layer]  # -2: the layer producing hidden_states[-2]
    seen = {}
    hooks = [getattr(layer.self_attn, name).register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
             for name in ("q_proj", "k_proj")]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values, vision_feature_layer=model.config.vision_feature_layer,
                                            vision_feature_select_strategy="default").pooler_output[0]
    for hook in hooks:
        hook.remove()
    heads = model.config.vision_config.num_attention_heads
    head_dim = model.config.vision_config.hidden_size // heads
    cls_query = seen["q_proj"][:, 0].unflatten(-1, (heads, head_dim))
    keys = seen["k_proj"].unflatten(-1, (heads, head_dim)).transpose(1, 2)
    torch.testing.assert_close(record["features"][0], features, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(record["cls_query"], cls_query, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(record["keys"], keys, rtol=1e-4, atol=1e-4)
    assert record["scale"] == head_dim**-0.5


def test_environment_variable_turns_carving_on_for_vllms_own_llava(model_dir):
    """TOKENCARVE_VLLM_BUDGET alone (no hf_overrides): vLLM's LlavaForConditionalGeneration resolves to the
    plugin's class and its processor reports the budget; checked in a fresh process, as vLLM would start."""
    code = f"""
from vllm.config import ModelConfig
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.plugins import load_general_plugins
load_general_plugins()
config = ModelConfig(model={str(model_dir)!r}, dtype="float32")
info = MULTIMODAL_REGISTRY.create_processor(config).info
print(config.architectures, type(info).__name__, info.get_num_image_tokens(image_width=336, image_height=336))
"""
    env = {**os.environ, "TOKENCARVE_VLLM_BUDGET": "100"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "['LlavaForConditionalGeneration'] TokenCarveLlavaProcessingInfo 100"
