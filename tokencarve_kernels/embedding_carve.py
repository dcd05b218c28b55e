"""Embedding-stage TokenCarve: carve an image's projected features before they enter the LLM.

The variant for serving engines, which fix each image's token count before any decoder layer runs
(python_ref/embedding_carve.py has the definition): information scores on the projected features, the
attention term from the vision tower's [CLS] query over the patch keys of the feature layer, then the
unchanged rank fusion, stage I and stage II. Two ops: `last_query_attention` and `carve`
(sync-free but for the exact information score's eigh on CUDA: one sync per image).
"""

import torch

from .ops import carve, last_query_attention


def cls_query_and_keys(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a ViT layer's query and key projections into what `embedding_carve` reads.

    q, k [B, 1 + Np, H * d] (token 0 is [CLS]) -> cls_query [B, H, d], keys [B, H, 1 + Np, d] (views, no copy).
    """
    if q.dim() != 3 or q.shape != k.shape:
        raise ValueError(f"q and k must be 3-D [B, 1 + Np, H * d] of one shape, got {list(q.shape)} and {list(k.shape)}")
    if num_heads < 1 or q.shape[-1] % num_heads:
        raise ValueError(f"num_heads must divide the projection width {q.shape[-1]}, got {num_heads}")
    width = k.shape[-1]
    cls_query = q[:, 0].unflatten(-1, (num_heads, width // num_heads))
    keys = k.unflatten(-1, (num_heads, width // num_heads)).transpose(1, 2)
    return cls_query, keys


def embedding_carve(
    features: torch.Tensor,
    cls_query: torch.Tensor,
    keys: torch.Tensor,
    budget: int,
    scale: float | None = None,
    attn_weight: float = 0.5,
    rank: int = 0,
    seed: int = 0,
    merge: str = "mean",
    *,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding-stage TokenCarve of each image in a batch, to a fixed budget.

    features [B, Np, D] float32/float16/bfloat16/float64 (the projector's output for the Np patches),
    cls_query [B, H, d] and keys [B, H, 1 + Np, d] (the vision tower's feature layer, [CLS] first; see
    `cls_query_and_keys`) -> carved [B, T, D] in features' dtype, keep_idx [B, T] int64 ascending patch
    indices, T = min(budget, Np). scale defaults to d ** -0.5. The other arguments are `carve`'s.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be a 3-D tensor [B, Np, D], got {features.dim()}-D")
    if keys.dim() != 4 or keys.shape[2] != features.shape[1] + 1:
        raise ValueError(
            f"keys must be [B, H, 1 + Np, d] with 1 + Np = {features.shape[1] + 1} ([CLS] first), got {list(keys.shape)}"
        )
    if cls_query.shape[0] != features.shape[0]:
        raise ValueError(f"cls_query must have the batch size B = {features.shape[0]} of features, got {cls_query.shape[0]}")
    if scale is None:
        scale = cls_query.shape[-1] ** -0.5
    attn = last_query_attention(cls_query, keys, 1, features.shape[1], scale, check_finite=check_finite)
    return carve(features, attn, budget, attn_weight, rank, seed, merge, check_finite=check_finite)
