"""vLLM plugin: embedding-stage TokenCarve for LLaVA-1.5 models, out of tree.

vLLM fixes each image's number of placeholder tokens when it processes the prompt, before the vision
encoder runs, and pages the KV cache from then on; so the carve cannot happen inside the LLM (SPEC.md's
layer-2 TokenCarve). It happens at the embedding stage instead (`tokencarve_kernels.embedding_carve`):
each image's 576 projected features become `budget` tokens, a number that depends on the configuration
only, and the prompt holds `budget` placeholders per image instead of 576.

vLLM loads `register` in every process through the `vllm.general_plugins` entry point. It registers the
architecture `TokenCarveLlavaForConditionalGeneration` (vllm_llava.py, imported lazily), and, when the
environment sets TOKENCARVE_VLLM_BUDGET, also maps vLLM's `LlavaForConditionalGeneration` to it, so an
unchanged `vllm serve llava-hf/llava-1.5-7b-hf` carves. The budget comes from the model's config first
(`hf_overrides={"tokencarve_budget": k}`), then from TOKENCARVE_VLLM_BUDGET; 0 or neither means off.
"""

import os

ARCHITECTURE = "TokenCarveLlavaForConditionalGeneration"
BUDGET_ENV = "TOKENCARVE_VLLM_BUDGET"
BUDGET_KEY = "tokencarve_budget"


def _parse_budget(value: object, source: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{source} must be a non-negative integer (tokens kept per image; 0 = off), got {value!r}")
    return value


def env_budget() -> int:
    """TOKENCARVE_VLLM_BUDGET as an int; 0 when unset (off)."""
    return _parse_budget(os.environ.get(BUDGET_ENV, "0"), BUDGET_ENV)


def budget_for(hf_config: object) -> int:
    """Tokens kept per image for this model: config's `tokencarve_budget` (hf_overrides), else the
    environment's TOKENCARVE_VLLM_BUDGET; 0 = carving off."""
    value = getattr(hf_config, BUDGET_KEY, None)
    if value is None:
        return env_budget()
    return _parse_budget(value, f"hf_overrides[{BUDGET_KEY!r}]")


def register() -> None:
    """The `vllm.general_plugins` entry point (runs once in each vLLM process)."""
    from vllm import ModelRegistry

    target = f"tokencarve_kernels.integrations.vllm_llava:{ARCHITECTURE}"
    ModelRegistry.register_model(ARCHITECTURE, target)
    if env_budget() > 0:
        ModelRegistry.register_model("LlavaForConditionalGeneration", target)
