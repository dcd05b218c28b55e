"""merge: stage II and compaction. Hand-worked cases for the reference, then the op against it."""

import pytest
import torch

import python_ref
import tokencarve_kernels as tk
from tests.inputs import attention_scores, hidden_states

# Six 2-D tokens: t2 duplicates t0, t3 points along t0, t4 along t1, t5 half-way.
HIDDEN = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
ORDER = torch.tensor([[2, 0, 1, 3, 4, 5]])  # A = (t2, t0, t1), B = (t3, t4, t5) when K1 = 6


# ---- the reference, by hand ----

def test_argmax_tie_goes_to_lowest_a_position_not_lowest_token():
    # budget 4: K1 = 6, nA = 3, r = 2. t3 is equally similar to t2 (A position 0) and t0 (position 1).
    carved, keep_idx, sizes = python_ref.merge(HIDDEN, ORDER, 4)
    assert keep_idx.tolist() == [[0, 1, 2, 5]]
    # t2 <- (t2 + t3) / 2 ; t1 <- (t1 + t4) / 2 ; t0 untouched ; t5 kept (smallest m_b)
    assert carved.tolist() == [[[1.0, 0.0], [0.0, 2.0], [1.5, 0.0], [1.0, 1.0]]]
    assert sizes.tolist() == [[1.0, 2.0, 2.0, 1.0]]


def test_merge_order_tie_goes_to_earlier_source():
    # budget 5: r = 1, and t3, t4 both have m_b = 1 exactly: t3 (earlier in B) merges, t4 stays.
    carved, keep_idx, _ = python_ref.merge(HIDDEN, ORDER, 5)
    assert keep_idx.tolist() == [[0, 1, 2, 4, 5]]
    assert carved[0, 2].tolist() == [1.5, 0.0]
    assert carved[0, 3].tolist() == [0.0, 3.0]


def test_merge_modes_by_hand():
    # budget 3: K1 = 4, order (t2, t0 | t1, t5); t5 (m = cos 45deg) merges into t2, t1 (m = 0) is kept.
    order = torch.tensor([[2, 0, 1, 5]])
    w = torch.tensor(0.5**0.5, dtype=torch.float32).double().item()  # the float32-rounded similarity
    mean = python_ref.merge(HIDDEN, order, 3, "mean")
    sim = python_ref.merge(HIDDEN, order, 3, "similarity")
    sizes_in = torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0, 2.0]])
    size = python_ref.merge(HIDDEN, order, 3, "size", sizes_in)
    for out in (mean, sim, size):
        assert out[1].tolist() == [[0, 1, 2]]
    assert mean[0][0, 2].tolist() == [1.0, 0.5]
    torch.testing.assert_close(sim[0][0, 2], torch.tensor([1.0, w / (1.0 + w)]))
    assert size[0][0, 2].tolist() == pytest.approx([1.0, 0.4])
    assert size[2].tolist() == [[1.0, 1.0, 5.0]]
    # all-ones sizes: the size-weighted mean is the plain mean
    assert torch.equal(python_ref.merge(HIDDEN, order, 3, "size")[0], mean[0])


def test_zero_vector_has_similarity_zero():
    hidden = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]])
    sim = python_ref.cosine_similarity(hidden, torch.tensor([[0, 2]]), torch.tensor([[1, 3]]))
    assert sim.tolist() == [[[0.0, 0.0], [-1.0, 0.0]]]


def test_keep_all_returns_input_unchanged():
    hidden = hidden_states(2, 9, 5, seed=1)
    order = python_ref.select(attention_scores(2, 9), python_ref.info_scores(hidden), 9)
    carved, keep_idx, sizes = python_ref.merge(hidden, order, 9)
    assert torch.equal(carved, hidden) and keep_idx.tolist() == [list(range(9))] * 2
    assert torch.equal(sizes, torch.ones(2, 9))


# ---- the op against the reference ----

def _case(batch, nv, dim, budget, seed, dtype=torch.float32):
    hidden = hidden_states(batch, nv, dim, seed=seed, dtype=dtype)
    info = python_ref.info_scores(hidden)
    order = python_ref.select(attention_scores(batch, nv, seed=seed), info, budget)
    return hidden, order


def _assert_same(out, ref, dtype):
    carved, keep_idx, sizes = out
    assert torch.equal(keep_idx, ref[1])
    assert torch.equal(sizes, ref[2])
    assert carved.dtype == dtype
    # float64 accumulation on both sides: equal up to the final rounding to the output dtype
    torch.testing.assert_close(carved, ref[0], rtol=torch.finfo(dtype).eps, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["mean", "similarity", "size"])
@pytest.mark.parametrize("nv, dim, budget", [(1, 8, 1), (7, 5, 3), (64, 33, 63), (96, 130, 20), (40, 17, 39), (25, 64, 2)])
def test_merge_matches_reference(nv, dim, budget, mode, dtype):
    hidden, order = _case(3, nv, dim, budget, seed=nv * dim + budget, dtype=dtype)
    sizes = torch.randint(1, 4, (3, nv), generator=torch.Generator().manual_seed(nv)).float() if mode == "size" else None
    _assert_same(tk.merge(hidden, order, budget, mode, sizes), python_ref.merge(hidden, order, budget, mode, sizes), dtype)


@pytest.mark.parametrize("case", ["duplicates", "zero_rows", "all_equal_scores", "nonfinite"])
def test_merge_adversarial(case):
    nv, dim, budget = 48, 24, 16
    hidden = hidden_states(2, nv, dim, seed=5)
    if case == "duplicates":  # every source has several exactly tied best matches
        hidden = hidden[:, :6].repeat(1, nv // 6, 1)
    elif case == "zero_rows":
        hidden[:, ::3] = 0.0
    elif case == "nonfinite":
        hidden[0, 4, 1] = float("nan")
        hidden[1, 10, 0] = float("inf")
    attn = torch.full((2, nv), 0.5) if case == "all_equal_scores" else attention_scores(2, nv)
    info = torch.ones(2, nv) if case == "all_equal_scores" else python_ref.info_scores(hidden)
    order = python_ref.select(attn, info, budget)
    for mode in ("mean", "similarity"):
        out = tk.merge(hidden, order, budget, mode, check_finite=False)
        ref = python_ref.merge(hidden, order, budget, mode)
        assert torch.equal(out[1], ref[1])
        torch.testing.assert_close(out[0], ref[0], rtol=1e-6, atol=0.0, equal_nan=True)


def test_merge_rejects_bad_order_values():
    hidden = hidden_states(1, 10, 4)
    with pytest.raises(ValueError, match="outside"):
        tk.merge(hidden, torch.tensor([[0, 1, 2, 3, 4, 10]]), 4)
    with pytest.raises(ValueError, match="twice"):
        tk.merge(hidden, torch.tensor([[0, 1, 2, 3, 4, 4]]), 4)


def test_merge_rejects_order_of_wrong_length():
    hidden = hidden_states(1, 10, 4)
    with pytest.raises(ValueError, match=r"order must have shape \[B, K1\] = \[1, 6\]"):
        tk.merge(hidden, torch.arange(5)[None], 4)
