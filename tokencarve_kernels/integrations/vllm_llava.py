"""vLLM's LLaVA-1.5 with embedding-stage TokenCarve: imported by vLLM only when the architecture is used.

Two subclasses of vLLM's own classes, nothing copied from them:
  TokenCarveLlavaProcessingInfo   reports min(budget, 576) placeholder tokens per image, so the prompt,
                                  the positions and the KV cache are sized for the carved image;
  TokenCarveLlavaForConditionalGeneration
                                  keeps the [CLS] query and the keys of the vision tower's feature layer
                                  (a forward hook on that layer's fused qkv projection), then carves the
                                  projector's output with `embedding_carve` (two torch.ops.tokencarve ops,
                                  deterministic; on CUDA the exact score's eigh syncs once per image). Precomputed `image_embeds` pass through
                                  uncarved: their token count is their own.
Pixtral-HF checkpoints keep vLLM's Pixtral processor (the model refuses to carve them at load).
"""

import torch
from transformers import CLIPVisionConfig, LlavaConfig, PixtralVisionConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    PixtralHFMultiModalProcessor,
    PixtralHFProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..embedding_carve import cls_query_and_keys, embedding_carve
from .vllm import budget_for


class TokenCarveLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        num_patches = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        budget = budget_for(self.get_hf_config())
        return min(budget, num_patches) if budget else num_patches


def _check_supported(config) -> None:
    """The embedding-stage attention term needs a [CLS] token and one feature layer without it."""
    if not isinstance(config.vision_config, CLIPVisionConfig):
        raise NotImplementedError(
            f"TokenCarve for vLLM needs a CLIP vision tower (it scores patches by the [CLS] query), "
            f"got {type(config.vision_config).__name__}"
        )
    if config.vision_feature_select_strategy != "default":
        raise NotImplementedError(
            "TokenCarve for vLLM needs vision_feature_select_strategy='default' ([CLS] dropped from the "
            f"features), got {config.vision_feature_select_strategy!r}"
        )
    if not isinstance(config.vision_feature_layer, int):
        raise NotImplementedError(
            f"TokenCarve for vLLM needs a single vision_feature_layer, got {config.vision_feature_layer!r}"
        )


def _processing_info(ctx) -> LlavaProcessingInfo | PixtralHFProcessingInfo:
    """vLLM's LLaVA serves Pixtral-HF checkpoints with Pixtral's processor; so does this class (the model
    refuses to carve them at load), or TOKENCARVE_VLLM_BUDGET, which maps every LLaVA here, would break
    them even where tokencarve_budget=0 turns carving off."""
    if isinstance(ctx.get_hf_config(LlavaConfig).vision_config, PixtralVisionConfig):
        return PixtralHFProcessingInfo(ctx)
    return TokenCarveLlavaProcessingInfo(ctx)


def _processor(info, dummy_inputs) -> LlavaMultiModalProcessor | PixtralHFMultiModalProcessor:
    """The processor vLLM's LLaVA picks for the same checkpoint."""
    if isinstance(info, PixtralHFProcessingInfo):
        return PixtralHFMultiModalProcessor(info, dummy_inputs)
    return LlavaMultiModalProcessor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(
    _processor, info=_processing_info, dummy_inputs=LlavaDummyInputsBuilder
)
class TokenCarveLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokencarve_budget = budget_for(self.config)
        self._feature_qkv: torch.Tensor | None = None
        if self.tokencarve_budget:
            _check_supported(self.config)
            # The encoder is built only up to the feature layer: its last layer produces the features.
            self._feature_attn = self.vision_tower.vision_model.encoder.layers[-1].self_attn
            if self._feature_attn.tp_size != 1:
                raise NotImplementedError(
                    "TokenCarve for vLLM needs every vision attention head on each rank, but tensor parallelism "
                    f"splits them over {self._feature_attn.tp_size} ranks (vLLM's LLaVA has no data-parallel "
                    "vision encoder): use tensor_parallel_size=1"
                )
            self._feature_attn.qkv_proj.register_forward_hook(self._keep_feature_qkv)

    def _keep_feature_qkv(self, module, args, output) -> None:
        self._feature_qkv = output[0]  # [images, 1 + Np, 3 * H * d]

    def _process_image_input(self, image_input):
        features = super()._process_image_input(image_input)  # [images, Np, D]
        qkv, self._feature_qkv = self._feature_qkv, None
        if not self.tokencarve_budget or image_input["type"] == "image_embeds":
            return features
        q, k, _ = qkv.chunk(3, dim=-1)
        cls_query, keys = cls_query_and_keys(q, k, self._feature_attn.num_heads_per_partition)
        carved, _ = embedding_carve(
            features, cls_query, keys, self.tokencarve_budget, scale=self._feature_attn.scale, check_finite=False
        )
        return carved
