"""Embedding-stage TokenCarve: the variant that runs before the language model (for serving engines).

SPEC.md's TokenCarve runs inside the LLM, after decoder layer 1, scored by the last prompt token. A serving
engine such as vLLM fixes each image's token count when it processes the prompt, before any layer runs,
so there the carve has to happen on the projected visual features, before they enter the LLM. This
variant is text-agnostic and changes only where the two scores come from:
  information  the same information contribution score, on the projected visual features X [Np, D]
               (what the LLM receives as the image's tokens);
  attention    the vision tower's [CLS] query over the patch keys of the feature layer (the layer whose
               output the projector reads): a_i = mean_h softmax_j(scale * q_cls,h . k_j)[1 + i], the
               softmax over all 1 + Np keys ([CLS] first). The same `last_query_attention` with another
               query: q = the [CLS] query [B, H, d], k = that layer's keys [B, H, 1 + Np, d],
               vis_start = 1, vis_len = Np.
Rank fusion, stage I and stage II are unchanged, with a fixed budget T per image, so the number of tokens
an image becomes is a function of its size and the configuration only.
"""

import torch

from .carve import carve
from .last_query_attention import last_query_attention


def embedding_carve(
    features: torch.Tensor,
    cls_query: torch.Tensor,
    keys: torch.Tensor,
    budget: int,
    scale: float | None = None,
    attn_weight: float = 0.5,
    rank: int = 0,
    seed: int = 0,
    merge_mode: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """features [B, Np, D] (projected patch features), cls_query [B, H, d], keys [B, H, 1 + Np, d]
    -> carved [B, T, D] (features' dtype), keep_idx [B, T] int64 ascending patch indices, T = min(budget, Np).

    scale defaults to d ** -0.5, the vision tower's own softmax scale.
    """
    num_patches = features.shape[1]
    if keys.shape[2] != num_patches + 1:
        raise ValueError(f"keys must hold 1 + Np = {num_patches + 1} keys ([CLS] first), got {keys.shape[2]}")
    if scale is None:
        scale = cls_query.shape[-1] ** -0.5
    attn = last_query_attention(cls_query, keys, 1, num_patches, scale)
    return carve(features, attn, budget, attn_weight, rank, seed, merge_mode)
