"""last_query_attention: the reference against the dense attention matrix, then the op against it."""

import pytest
import torch

import python_ref
import tokencarve_kernels as tk
from tests.inputs import queries_keys, rel_err


@pytest.mark.parametrize("heads_q, heads_k", [(4, 4), (8, 2), (6, 1)], ids=["MHA", "GQA", "MQA"])
def test_reference_equals_last_row_of_dense_causal_softmax(heads_q, heads_k):
    batch, n, d = 2, 37, 16
    gen = torch.Generator().manual_seed(0)
    q_all = torch.randn(batch, heads_q, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, heads_k, n, d, generator=gen, dtype=torch.float64)
    dense = python_ref.eager_last_query_attention(q_all, k, 5, 20, d**-0.5)
    row = python_ref.last_query_attention(q_all[:, :, -1], k, 5, 20, d**-0.5)
    assert rel_err(row, dense) < 1e-6
    # the full row sums to one over all N keys, not over the visual span
    total = python_ref.last_query_attention(q_all[:, :, -1], k, 0, n, d**-0.5)
    torch.testing.assert_close(total.double().sum(-1), torch.ones(batch, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "batch, heads_q, heads_k, n, d, vis_start, vis_len",
    [(1, 4, 4, 1, 8, 0, 1), (3, 8, 2, 50, 16, 5, 30), (2, 6, 3, 77, 24, 40, 37), (1, 32, 8, 700, 64, 35, 576)],
    ids=lambda v: str(v),
)
def test_op_matches_reference(batch, heads_q, heads_k, n, d, vis_start, vis_len, dtype):
    q, k = queries_keys(batch, heads_q, heads_k, n, d, seed=n, dtype=dtype)
    out = tk.last_query_attention(q, k, vis_start, vis_len, d**-0.5)
    ref = python_ref.last_query_attention(q, k, vis_start, vis_len, d**-0.5)
    assert out.dtype == torch.float32 and out.shape == (batch, vis_len)
    assert rel_err(out, ref) < 1e-5  # inputs upcast to float32 before any arithmetic
