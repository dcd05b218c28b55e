"""select: rank fusion and stage I. Hand-worked tie cases for the reference, then the op against it."""

import pytest
import torch

import python_ref
import tokencarve_kernels as tk
from tests.devices import DEVICES, requires_cuda
from tests.inputs import attention_scores, hidden_states


# ---- the reference, by hand ----

def test_descending_ranks_ties_keep_token_order():
    score = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0]])
    assert python_ref.descending_ranks(score).tolist() == [[0, 4, 1, 3, 2]]


def test_descending_ranks_nonfinite_rank_last_by_index():
    score = torch.tensor([[float("nan"), 1.0, float("inf"), -float("inf"), 0.5]])
    # finite values first (1.0, 0.5), then the non-finite ones by token index (0, 2, 3)
    assert python_ref.descending_ranks(score).tolist() == [[2, 0, 3, 4, 1]]


def test_fused_score_ties_by_lower_index():
    # Nv = 4. attn ranks: t0->0, t1->3, t2->1, t3->2 ; info ranks: t0->3, t1->0, t2->2, t3->1
    attn = torch.tensor([[0.9, 0.1, 0.8, 0.5]])
    info = torch.tensor([[1.0, 9.0, 3.0, 5.0]])
    fused = python_ref.fuse_ranks(attn, info, 0.5)
    # t0: .5*4 + .5*1 = 2.5 ; t1: .5*1 + .5*4 = 2.5 ; t2: .5*3 + .5*2 = 2.5 ; t3: .5*2 + .5*3 = 2.5
    assert fused.tolist() == [[2.5, 2.5, 2.5, 2.5]]
    assert python_ref.select(attn, info, 2, 0.5).tolist() == [[0, 1, 2]]  # K1 = 3, all tied: index order
    assert python_ref.select(attn, info, 2, 1.0).tolist() == [[0, 2, 3]]  # attention only
    assert python_ref.select(attn, info, 2, 0.0).tolist() == [[1, 3, 2]]  # information only


def test_fused_rank_pair_symmetry_tie():
    # SPEC: ranks (3, 5) and (5, 3) score the same; the lower token index goes first.
    nv = 8
    r_a = torch.tensor([0, 1, 2, 5, 3, 4, 6, 7])
    r_c = torch.tensor([1, 0, 2, 3, 5, 4, 7, 6])
    attn = (nv - r_a).double()[None]
    info = (nv - r_c).double()[None]
    fused = python_ref.fuse_ranks(attn, info)
    assert fused[0, 3] == fused[0, 4]  # (5, 3) vs (3, 5)
    order = python_ref.select(attn, info, 5)  # K1 = 7
    pos = order[0].tolist()
    assert pos.index(3) < pos.index(4)


@pytest.mark.parametrize(
    "nv, budget, expected",
    [
        (10, 1, (1, 1, 0, 0)),       # K1 = int(1.5) = 1, no destination
        (10, 2, (2, 3, 1, 1)),
        (10, 5, (5, 7, 3, 2)),       # odd budget
        (10, 7, (7, 10, 5, 3)),      # 1.5 * budget > Nv: K1 = Nv
        (10, 10, (10, 10, 5, 0)),    # budget = Nv: keep all
        (10, 99, (10, 10, 5, 0)),
        (576, 128, (128, 192, 96, 64)),
        (576, 192, (192, 288, 144, 96)),
        (576, 64, (64, 96, 48, 32)),
    ],
)
def test_budget_split(nv, budget, expected):
    assert python_ref.budget_split(nv, budget) == expected


# ---- the op against the reference, on every device ----

def _scores(batch, nv, seed, dtype=torch.float32):
    info = python_ref.info_scores(hidden_states(batch, nv, 32, seed=seed))
    return attention_scores(batch, nv, seed=seed, dtype=dtype), info


def _select(attn, info, budget, attn_weight=0.5, device="cpu"):
    """The op on `device`, its result back on the CPU."""
    return tk.select(attn.to(device), info.to(device), budget, attn_weight, check_finite=False).cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
# 2049 and 3001 exceed the 2048 tokens of CUDA's one-block path: its multi-block path runs there.
@pytest.mark.parametrize("nv, budget", [(1, 1), (7, 3), (64, 63), (575, 128), (577, 192), (576, 64), (50, 50), (33, 500),
                                        (2049, 700), (3001, 64)])
@pytest.mark.parametrize("attn_weight", [0.5, 0.0, 1.0, 0.3])
def test_select_matches_reference(nv, budget, attn_weight, dtype, device):
    attn, info = _scores(3, nv, seed=nv + budget)
    attn = attn.to(dtype)  # low-precision attention ties more often: the tie rule must still hold
    out = tk.select(attn.to(device), info.to(device), budget, attn_weight)
    assert out.dtype == torch.int64 and out.device.type == device
    assert torch.equal(out.cpu(), python_ref.select(attn, info, budget, attn_weight))


ADVERSARIAL = ["all_equal", "integer_ties", "nonfinite", "signed_zeros", "duplicated", "mixed_dtypes", "nv1",
               "budget_nv_minus_1"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ADVERSARIAL)
def test_select_adversarial(case, device):
    nv, budget = 40, 12
    if case == "all_equal":
        attn, info = torch.full((3, nv), 0.25), torch.ones(3, nv)
    elif case == "integer_ties":
        gen = torch.Generator().manual_seed(1)
        attn = torch.randint(0, 4, (3, nv), generator=gen).float()
        info = torch.randint(0, 4, (3, nv), generator=gen).float()
    elif case == "nonfinite":
        attn, info = _scores(3, nv, seed=3)
        attn[0, [3, 9]] = float("nan")
        info[1, [0, 5]] = float("inf")
        info[0, 7] = -float("inf")
        attn[2] = float("nan")  # a whole image of non-finite attention: ranks by index
    elif case == "signed_zeros":  # -0.0 == +0.0: a sort on raw float bits would put one before the other
        gen = torch.Generator().manual_seed(2)
        attn = torch.where(torch.rand(3, nv, generator=gen) < 0.5, -0.0, 0.0)
        attn[:, ::7] = 1.0
        info = torch.where(torch.rand(3, nv, generator=gen) < 0.5, 0.0, -0.0)
    elif case == "duplicated":  # the same few values everywhere: every rank is decided by the tie rule
        attn, info = _scores(3, 5, seed=4)
        attn, info = attn.repeat(1, 8), info.repeat(1, 8)
    elif case == "mixed_dtypes":
        attn, info = _scores(3, nv, seed=5)
        attn, info = attn.to(torch.bfloat16), info.double()
    elif case == "nv1":
        nv, budget = 1, 1
        attn, info = _scores(3, nv, seed=6)
    else:  # budget = Nv - 1: K1 = Nv, r = Nv - budget = 1
        budget = nv - 1
        attn, info = _scores(3, nv, seed=7)
    ref = python_ref.select(attn, info, budget)
    assert torch.equal(_select(attn, info, budget, device=device), ref)
    if case == "all_equal":
        assert ref.tolist() == [list(range(18))] * 3


@pytest.mark.parametrize("device", DEVICES)
def test_select_empty_batch(device):
    out = torch.ops.tokencarve.select(torch.empty(0, 30, device=device), torch.empty(0, 30, device=device), 8)
    assert out.shape == (0, 12) and out.dtype == torch.int64 and out.device.type == device


def test_select_wrapper_rejects_nonfinite():
    attn, info = _scores(1, 10, seed=0)
    attn[0, 2] = float("nan")
    with pytest.raises(ValueError, match="attn holds NaN or Inf"):
        tk.select(attn, info, 4)


# ---- CUDA against the CPU kernel (GPU only) ----

@requires_cuda
@pytest.mark.parametrize("batch, nv, budget", [(3, 1, 1), (3, 64, 10), (3, 576, 128), (3, 1024, 300), (3, 1025, 300),
                                               (3, 2048, 700), (3, 2049, 700), (2, 4097, 1000), (1, 16384, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_select_cuda_equals_cpu(batch, nv, budget, dtype):
    """Both CUDA paths (one block per image up to Nv = 2048, rank counting beyond) give the CPU's order, bit for bit."""
    gen = torch.Generator().manual_seed(nv)
    attn = torch.rand(batch, nv, generator=gen).to(dtype)
    info = torch.randint(0, 50, (batch, nv), generator=gen).float()  # many exact ties
    for weight in (0.5, 0.3, 1.0):
        assert torch.equal(_select(attn, info, budget, weight, device="cuda"), _select(attn, info, budget, weight))
