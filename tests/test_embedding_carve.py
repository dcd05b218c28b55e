"""embedding_carve (the embedding-stage variant for serving engines): the reference against a dense ViT
attention matrix, the op path against the reference, the ViT projection split, errors, torch.compile."""

import pytest
import torch

import python_ref
import tokencarve_kernels as tk
from tests.inputs import hidden_states, queries_keys


def _vit_inputs(batch, patches, dim, heads, head_dim, seed=0, dtype=torch.float32):
    """features [B, Np, D], cls_query [B, H, d], keys [B, H, 1 + Np, d] ([CLS] first)."""
    features = hidden_states(batch, patches, dim, seed=seed, dtype=dtype)
    q, keys = queries_keys(batch, heads, heads, 1 + patches, head_dim, seed=seed, dtype=dtype)
    return features, q, keys


def test_reference_attention_is_the_cls_row_of_the_dense_vit_attention():
    # A ViT attends both ways (no causal mask): row 0 of softmax(Q K^T * scale), averaged over heads,
    # over the patch columns 1..Np, is the attention term.
    batch, patches, heads, d = 2, 49, 4, 16
    gen = torch.Generator().manual_seed(3)
    q_all = torch.randn(batch, heads, 1 + patches, d, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(batch, heads, 1 + patches, d, generator=gen, dtype=torch.float64)
    dense = torch.softmax(q_all @ k.transpose(-1, -2) * d**-0.5, dim=-1)          # [B, H, 1 + Np, 1 + Np]
    cls_row = dense[:, :, 0, 1:].mean(dim=1)                                       # [B, Np]
    features = hidden_states(batch, patches, 24, seed=3, dtype=torch.float64)
    carved, keep_idx = python_ref.embedding_carve(features, q_all[:, :, 0], k, 12)
    ref_carved, ref_keep = python_ref.carve(features, cls_row, 12)
    assert torch.equal(keep_idx, ref_keep) and torch.equal(carved, ref_carved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "batch, patches, dim, heads, head_dim, budget",
    [(1, 576, 64, 4, 16, 64), (3, 576, 48, 2, 32, 128), (2, 49, 33, 1, 8, 5), (2, 50, 16, 3, 8, 49), (1, 9, 8, 2, 4, 20)],
    ids=lambda v: str(v),
)
def test_op_matches_reference(batch, patches, dim, heads, head_dim, budget, dtype):
    features, q, keys = _vit_inputs(batch, patches, dim, heads, head_dim, seed=patches + budget, dtype=dtype)
    carved, keep_idx = tk.embedding_carve(features, q, keys, budget)
    ref_carved, ref_keep = python_ref.embedding_carve(features, q, keys, budget)
    t = min(budget, patches)
    assert carved.shape == (batch, t, dim) and carved.dtype == dtype and keep_idx.shape == (batch, t)
    assert torch.equal(keep_idx, ref_keep)
    torch.testing.assert_close(carved, ref_carved, rtol=torch.finfo(dtype).eps, atol=0.0)


def test_arguments_reach_carve():
    features, q, keys = _vit_inputs(2, 64, 24, 2, 8, seed=5)
    out = tk.embedding_carve(features, q, keys, 16, scale=0.2, attn_weight=0.25, rank=4, seed=7, merge="similarity")
    ref = python_ref.embedding_carve(features, q, keys, 16, scale=0.2, attn_weight=0.25, rank=4, seed=7, merge_mode="similarity")
    assert torch.equal(out[1], ref[1])
    torch.testing.assert_close(out[0], ref[0])


def test_cls_query_and_keys_split_heads_of_the_projections():
    batch, tokens, heads, d = 2, 10, 3, 4
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, tokens, heads * d, generator=gen)
    k = torch.randn(batch, tokens, heads * d, generator=gen)
    cls_query, keys = tk.cls_query_and_keys(q, k, heads)
    assert cls_query.shape == (batch, heads, d) and keys.shape == (batch, heads, tokens, d)
    for h in range(heads):
        assert torch.equal(cls_query[:, h], q[:, 0, h * d : (h + 1) * d])
        assert torch.equal(keys[:, h], k[:, :, h * d : (h + 1) * d])


def test_errors_name_the_argument():
    features, q, keys = _vit_inputs(2, 20, 8, 2, 4)
    with pytest.raises(ValueError, match=r"keys must be \[B, H, 1 \+ Np, d\] with 1 \+ Np = 21 \(\[CLS\] first\), got \[2, 2, 20, 4\]"):
        tk.embedding_carve(features, q, keys[:, :, 1:], 5)
    with pytest.raises(ValueError, match=r"keys must hold 1 \+ Np = 21 keys"):
        python_ref.embedding_carve(features, q, keys[:, :, 1:], 5)
    with pytest.raises(ValueError, match=r"features must be a 3-D tensor \[B, Np, D\], got 2-D"):
        tk.embedding_carve(features[0], q, keys, 5)
    with pytest.raises(ValueError, match=r"cls_query must have the batch size B = 2 of features, got 1"):
        tk.embedding_carve(features, q[:1], keys, 5)
    with pytest.raises(ValueError, match=r"tokencarve::carve: budget must be >= 1, got 0"):
        tk.embedding_carve(features, q, keys, 0)
    with pytest.raises(ValueError, match=r"num_heads must divide the projection width 12, got 5"):
        tk.cls_query_and_keys(torch.randn(2, 5, 12), torch.randn(2, 5, 12), 5)
    with pytest.raises(ValueError, match=r"q and k must be 3-D"):
        tk.cls_query_and_keys(torch.randn(2, 5, 12), torch.randn(2, 6, 12), 3)


def test_torch_compile_fullgraph_without_finite_check():
    # What a serving engine runs: no host sync, no data-dependent Python, so one graph.
    features, q, keys = _vit_inputs(2, 36, 16, 2, 8, seed=9)

    def fn(f, q, k):
        return tk.embedding_carve(f, q, k, 8, check_finite=False)

    out, ref = torch.compile(fn, fullgraph=True)(features, q, keys), fn(features, q, keys)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
