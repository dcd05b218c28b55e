"""merge: stage II and compaction. Hand-worked cases for the reference, then the op against it."""

import pytest
import torch

import python_ref
import tokencarve_kernels as tk
from tests.devices import DEVICES, requires_cuda
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


# ---- the op against the reference, on every device ----

def _case(batch, nv, dim, budget, seed, dtype=torch.float32):
    hidden = hidden_states(batch, nv, dim, seed=seed, dtype=dtype)
    info = python_ref.info_scores(hidden)
    order = python_ref.select(attention_scores(batch, nv, seed=seed), info, budget)
    return hidden, order


def _merge(hidden, order, budget, mode="mean", sizes=None, device="cpu"):
    """The op on `device`, its outputs back on the CPU."""
    sizes = None if sizes is None else sizes.to(device)
    out = tk.merge(hidden.to(device), order.to(device), budget, mode, sizes, check_finite=False)
    assert all(t.device.type == device for t in out)
    return tuple(t.cpu() for t in out)


def _assert_same(out, ref, dtype):
    carved, keep_idx, sizes = out
    assert torch.equal(keep_idx, ref[1])
    assert torch.equal(sizes, ref[2])
    assert carved.dtype == dtype
    # float64 accumulation on both sides: equal up to the final rounding to the output dtype
    torch.testing.assert_close(carved, ref[0], rtol=torch.finfo(dtype).eps, atol=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["mean", "similarity", "size"])
@pytest.mark.parametrize("nv, dim, budget", [(1, 8, 1), (7, 5, 3), (64, 33, 63), (96, 130, 20), (40, 17, 39), (25, 64, 2)])
def test_merge_matches_reference(nv, dim, budget, mode, dtype, device):
    hidden, order = _case(3, nv, dim, budget, seed=nv * dim + budget, dtype=dtype)
    sizes = torch.randint(1, 4, (3, nv), generator=torch.Generator().manual_seed(nv)).float() if mode == "size" else None
    out = _merge(hidden, order, budget, mode, sizes, device=device)
    _assert_same(out, python_ref.merge(hidden, order, budget, mode, sizes), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["duplicates", "zero_rows", "all_zero", "all_equal_scores", "nonfinite", "nv1",
                                  "budget_nv_minus_1"])
def test_merge_adversarial(case, device):
    nv, dim, budget = 48, 24, 16
    hidden = hidden_states(3, nv, dim, seed=5)
    if case == "duplicates":  # every source has several exactly tied best matches
        hidden = hidden[:, :6].repeat(1, nv // 6, 1)
    elif case == "zero_rows":  # zero vectors: cosine 0 with everything
        hidden[:, ::3] = 0.0
    elif case == "all_zero":  # every similarity 0: every choice is made by the tie rules
        hidden.zero_()
    elif case == "nonfinite":
        hidden[0, 4, 1] = float("nan")
        hidden[1, 10, 0] = float("inf")
        hidden[2, :, 0] = float("nan")  # every row of one image non-finite: similarities all -inf
    elif case == "nv1":
        nv, budget = 1, 1
        hidden = hidden[:, :1]
    elif case == "budget_nv_minus_1":  # r = 1
        budget = nv - 1
    attn = torch.full((3, nv), 0.5) if case == "all_equal_scores" else attention_scores(3, nv)
    info = torch.ones(3, nv) if case in ("all_equal_scores", "nonfinite") else python_ref.info_scores(hidden)
    order = python_ref.select(attn, info, budget)
    for mode in ("mean", "similarity"):
        out = _merge(hidden, order, budget, mode, device=device)
        ref = python_ref.merge(hidden, order, budget, mode)
        assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])
        torch.testing.assert_close(out[0], ref[0], rtol=1e-6, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_empty_batch(device):
    hidden, order = torch.empty(0, 30, 8, device=device), torch.empty(0, 12, dtype=torch.int64, device=device)
    carved, keep_idx, sizes = torch.ops.tokencarve.merge(hidden, order, 8)
    assert carved.shape == (0, 8, 8) and keep_idx.shape == (0, 8) and sizes.shape == (0, 8)


def test_merge_rejects_bad_order_values():
    # CPU only: a CUDA kernel cannot raise on values without a sync; it stops with a device-side assertion.
    hidden = hidden_states(1, 10, 4)
    with pytest.raises(ValueError, match="outside"):
        tk.merge(hidden, torch.tensor([[0, 1, 2, 3, 4, 10]]), 4)
    with pytest.raises(ValueError, match="twice"):
        tk.merge(hidden, torch.tensor([[0, 1, 2, 3, 4, 4]]), 4)


def test_merge_rejects_order_of_wrong_length():
    hidden = hidden_states(1, 10, 4)
    with pytest.raises(ValueError, match=r"order must have shape \[B, K1\] = \[1, 6\]"):
        tk.merge(hidden, torch.arange(5)[None], 4)


# ---- CUDA against the CPU kernel (GPU only) ----

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["mean", "similarity", "size"])
# D = 0, D not a multiple of the 32-feature tiles, LLaVA-1.5's 576 x 4096, Nv past the one-block select path,
# and Nv = 16384 (nA = nB = 3072: the plan's long loops).
@pytest.mark.parametrize("nv, dim, budget", [(1, 8, 1), (7, 5, 3), (40, 0, 10), (96, 130, 20), (576, 1000, 64),
                                             (576, 4096, 128), (2500, 64, 600), (16384, 32, 4096)])
def test_merge_cuda_equals_cpu(nv, dim, budget, mode, dtype):
    """Same merge decisions, hence the same keep_idx, and the carved rows bit for bit: the CUDA kernel adds the
    same float64 products in the CPU kernel's order. (The similarities themselves are summed in another order;
    only their float32 roundings are compared, which agree unless a value lies within 1e-16 of a float32
    rounding boundary.)"""
    batch = 1 if nv > 2500 else 3
    gen = torch.Generator().manual_seed(nv + dim)
    hidden = (torch.randn(batch, nv, dim, generator=gen, dtype=torch.float64) * 3).to(dtype)
    if nv > 8:
        hidden[:, 1::5] = hidden[:, 0:1]  # duplicated tokens: exact ties on both devices
    attn, info = torch.rand(batch, nv, generator=gen), torch.rand(batch, nv, generator=gen)
    order = tk.select(attn, info, budget)
    sizes = torch.randint(1, 5, (batch, nv), generator=gen).float() if mode == "size" else None
    cuda_out = _merge(hidden, order, budget, mode, sizes, device="cuda")
    cpu_out = _merge(hidden, order, budget, mode, sizes)
    for got, want in zip(cuda_out, cpu_out):
        assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(cuda_out, _merge(hidden, order, budget, mode, sizes, device="cuda")))
