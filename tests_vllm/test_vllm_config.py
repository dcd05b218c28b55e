"""Where the plugin's budget comes from (hf_overrides, then TOKENCARVE_VLLM_BUDGET), what it refuses at load,
and what it leaves uncarved (precomputed `image_embeds`).

No engine is started. Models are built the way vLLM's model loader builds them (`initialize_model`, or
`get_model` with the weights, on the VllmConfig that `EngineArgs` makes) from the tiny LLaVA-1.5 of
tiny_llava.py, edited through a callable `hf_overrides`: in this process as a single rank, and in two
processes for tensor parallelism.
"""

import os
import subprocess
import sys
import types

import pytest
import torch

from tests_vllm.tiny_llava import IMAGE_TOKEN_ID, NUM_PATCHES, TEXT_HIDDEN, make_image
from tokencarve_kernels.integrations.vllm import ARCHITECTURE, BUDGET_ENV, budget_for, env_budget

BUDGET = 64
PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"


@pytest.fixture(autouse=True)
def _no_budget_in_environment(monkeypatch):
    """Every test starts without TOKENCARVE_VLLM_BUDGET; those about it set it."""
    monkeypatch.delenv(BUDGET_ENV, raising=False)


def test_config_key_wins_over_environment(monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "128")
    assert budget_for(types.SimpleNamespace(tokencarve_budget=64)) == 64
    assert budget_for(types.SimpleNamespace(tokencarve_budget=0)) == 0  # off for this model
    assert budget_for(types.SimpleNamespace()) == 128


def test_unset_means_off():
    assert env_budget() == 0 and budget_for(types.SimpleNamespace()) == 0


@pytest.mark.parametrize("raw", ["-1", "12.5", "lots", ""])
def test_bad_environment_value_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv(BUDGET_ENV, raw)
    with pytest.raises(ValueError, match=f"TOKENCARVE_VLLM_BUDGET must be a non-negative integer .*got {raw!r}"):
        env_budget()


@pytest.mark.parametrize("value", [-3, 64.0, True, "sixty"])
def test_bad_config_value_names_the_key(value):
    with pytest.raises(ValueError, match=r"hf_overrides\['tokencarve_budget'\] must be a non-negative integer"):
        budget_for(types.SimpleNamespace(tokencarve_budget=value))


# ---- building the model as vLLM's loader does ----

def _siglip(config):
    from transformers import SiglipVisionConfig

    config.vision_config = SiglipVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                              num_attention_heads=2, image_size=336, patch_size=14)


def _pixtral(config):
    from transformers import PixtralVisionConfig

    config.vision_config = PixtralVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                               num_attention_heads=2, head_dim=64, image_size=336, patch_size=14)


def _full_features(config):
    config.vision_feature_select_strategy = "full"


def _several_layers(config):
    config.vision_feature_layer = [-2, -3]


# (edit of the LLaVA-1.5 config, what the refusal must name)
UNSUPPORTED = {
    "siglip": (_siglip, r"needs a CLIP vision tower .*got SiglipVisionConfig"),
    "pixtral": (_pixtral, r"needs a CLIP vision tower .*got PixtralVisionConfig"),
    "full": (_full_features, r"needs vision_feature_select_strategy='default' .*got 'full'"),
    "several-layers": (_several_layers, r"needs a single vision_feature_layer, got \[-2, -3\]"),
}


def _vllm_config(model_dir, budget, edit=None, **engine_args):
    """The VllmConfig `LLM(model_dir, hf_overrides=...)` would make for the plugin's architecture."""
    from vllm.engine.arg_utils import EngineArgs

    def overrides(config):
        config.architectures = [ARCHITECTURE]
        config.tokencarve_budget = budget
        if edit is not None:
            edit(config)
        return config

    return EngineArgs(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=2048,
                      hf_overrides=overrides, **engine_args).create_engine_config()


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    """vLLM's distributed state for one CPU rank (its parallel layers read the TP size from it); the plugin
    registered as vLLM registers it in each process."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import cleanup_dist_env_and_memory, ensure_model_parallel_initialized, init_distributed_environment
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    init_method = f"file://{tmp_path_factory.mktemp('dist') / 'store'}"
    with set_current_vllm_config(VllmConfig()):  # the parallel groups read it; any config of one rank will do
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=init_method, local_rank=0, backend="gloo")
        ensure_model_parallel_initialized(1, 1)
    yield
    cleanup_dist_env_and_memory()


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_llava_is_refused_at_load(case, model_dir, single_rank):
    from vllm.model_executor.model_loader.utils import initialize_model

    edit, message = UNSUPPORTED[case]
    with pytest.raises(NotImplementedError, match=message):
        initialize_model(vllm_config=_vllm_config(model_dir, BUDGET, edit))


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_llava_loads_with_carving_off(case, model_dir, single_rank):
    """Budget 0 turns carving off for the model: vLLM's own LLaVA supports these towers and strategies,
    so the refusal above is the plugin's, and only when it would carve."""
    from vllm.model_executor.model_loader.utils import initialize_model

    model = initialize_model(vllm_config=_vllm_config(model_dir, 0, UNSUPPORTED[case][0]))
    assert model.tokencarve_budget == 0


def test_pixtral_keeps_vllms_own_processor(model_dir):
    """A Pixtral-HF LLaVA gets the processor vLLM's own LLaVA gives it (Pixtral's, its own token counts),
    carving on or off: TOKENCARVE_VLLM_BUDGET maps vLLM's LLaVA to the plugin for every LLaVA checkpoint."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins

    load_general_plugins()

    def processor(architecture, budget=None):
        def overrides(config):
            _pixtral(config)
            config.architectures = [architecture]
            if budget is not None:
                config.tokencarve_budget = budget
            return config

        made = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=str(model_dir), dtype="float32", hf_overrides=overrides))
        return type(made).__name__, type(made.info).__name__

    own = processor("LlavaForConditionalGeneration")
    assert own == ("PixtralHFMultiModalProcessor", "PixtralHFProcessingInfo")
    assert processor(ARCHITECTURE, 0) == own and processor(ARCHITECTURE, BUDGET) == own


_TP_RANK = """
import sys
from vllm.config import set_current_vllm_config
from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.model_loader.utils import initialize_model
from vllm.plugins import load_general_plugins

model_dir, init_method, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
load_general_plugins()
config = EngineArgs(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=2048, tensor_parallel_size=2,
                    hf_overrides={"architectures": [sys.argv[4]], "tokencarve_budget": 64}).create_engine_config()
with set_current_vllm_config(config):
    init_distributed_environment(world_size=2, rank=rank, distributed_init_method=init_method, local_rank=rank, backend="gloo")
    ensure_model_parallel_initialized(2, 1)
try:
    initialize_model(vllm_config=config)
except NotImplementedError as error:
    print("NotImplementedError:", error)
else:
    print("built")
"""


def test_tensor_parallelism_is_refused_at_load(model_dir, tmp_path):
    """tensor_parallel_size=2: each of two ranks (two processes, gloo) refuses to build the model, because
    vLLM's LLaVA splits the vision heads the [CLS] attention averages over."""
    init_method = f"file://{tmp_path / 'store'}"
    env = {k: v for k, v in os.environ.items() if k != BUDGET_ENV}
    env["VLLM_DIST_IDENT"] = f"tokencarve-tp-{os.getpid()}"  # names the ranks' shared memory; vLLM's CPU worker sets it
    ranks = [subprocess.Popen([sys.executable, "-c", _TP_RANK, str(model_dir), init_method, str(rank), ARCHITECTURE],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    for rank in ranks:
        out, err = rank.communicate(timeout=300)
        assert rank.returncode == 0, err[-3000:]
        last = out.strip().splitlines()[-1]
        assert last.startswith("NotImplementedError: TokenCarve for vLLM needs every vision attention head"), last
        assert "splits them over 2 ranks" in last and "use tensor_parallel_size=1" in last


# ---- precomputed image embeddings ----

def test_image_embeds_keep_their_own_token_count(model_dir):
    """The processor gives an image BUDGET placeholders, but precomputed embeddings as many as they have rows."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    config = ModelConfig(model=str(model_dir), dtype="float32", enable_mm_embeds=True,
                         hf_overrides={"architectures": [ARCHITECTURE], "tokencarve_budget": BUDGET})
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    for data, tokens in ((make_image(0), BUDGET), (torch.zeros(1, NUM_PATCHES, TEXT_HIDDEN), NUM_PATCHES),
                         (torch.zeros(1, 100, TEXT_HIDDEN), 100)):
        prompt_ids = processor(PROMPT, processor.info.parse_mm_data({"image": data}))["prompt_token_ids"]
        assert prompt_ids.count(IMAGE_TOKEN_ID) == tokens


def test_image_embeds_pass_through_the_model_uncarved(model_dir, single_rank, monkeypatch):
    """The carving model (weights loaded) carves pixels to BUDGET tokens but returns embeddings as given,
    also between two pixel batches (the kept [CLS] query and keys of one batch never reach another)."""
    from transformers import AutoProcessor
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model

    # vLLM's CPU model runner makes this a no-op before it loads a model (torch has no accelerator here).
    monkeypatch.setattr(torch.accelerator, "empty_cache", lambda: None)
    vllm_config = _vllm_config(model_dir, BUDGET, enable_mm_embeds=True)
    pixel_values = AutoProcessor.from_pretrained(model_dir)(
        images=[make_image(1), make_image(2)], text=["<image>"] * 2, return_tensors="pt")["pixel_values"]
    embeds = torch.randn(3, NUM_PATCHES, TEXT_HIDDEN, generator=torch.Generator().manual_seed(0))
    with set_current_vllm_config(vllm_config), torch.no_grad():  # as vLLM's worker loads and runs the model
        model = get_model(vllm_config=vllm_config)
        first = model.embed_multimodal(pixel_values=pixel_values)
        passed = model.embed_multimodal(image_embeds=embeds)
        again = model.embed_multimodal(pixel_values=pixel_values)
    assert first.shape == (2, BUDGET, TEXT_HIDDEN)  # carving is on in this model
    assert torch.equal(again, first)
    assert passed.shape == embeds.shape and torch.equal(passed, embeds)
