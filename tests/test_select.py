"""select: rank fusion and stage I. Hand-worked tie cases for the reference, then the op against it."""

import pytest
import torch

import python_ref
import tokencarve_kernels as tk
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


# ---- the op against the reference ----

def _scores(batch, nv, seed, dtype=torch.float32):
    info = python_ref.info_scores(hidden_states(batch, nv, 32, seed=seed))
    return attention_scores(batch, nv, seed=seed, dtype=dtype), info


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nv, budget", [(1, 1), (7, 3), (64, 63), (575, 128), (577, 192), (576, 64), (50, 50), (33, 500)])
@pytest.mark.parametrize("attn_weight", [0.5, 0.0, 1.0, 0.3])
def test_select_matches_reference(nv, budget, attn_weight, dtype):
    attn, info = _scores(3, nv, seed=nv + budget)
    attn = attn.to(dtype)  # low-precision attention ties more often: the tie rule must still hold
    out = tk.select(attn, info, budget, attn_weight)
    assert out.dtype == torch.int64
    assert torch.equal(out, python_ref.select(attn, info, budget, attn_weight))


@pytest.mark.parametrize("case", ["all_equal", "integer_ties", "nonfinite"])
def test_select_adversarial(case):
    nv, budget = 40, 12
    if case == "all_equal":
        attn, info = torch.full((2, nv), 0.25), torch.ones(2, nv)
    elif case == "integer_ties":
        gen = torch.Generator().manual_seed(1)
        attn = torch.randint(0, 4, (2, nv), generator=gen).float()
        info = torch.randint(0, 4, (2, nv), generator=gen).float()
    else:
        attn, info = _scores(2, nv, seed=3)
        attn[0, [3, 9]] = float("nan")
        info[1, [0, 5]] = float("inf")
        info[0, 7] = -float("inf")
    ref = python_ref.select(attn, info, budget)
    assert torch.equal(tk.select(attn, info, budget, check_finite=False), ref)
    if case == "all_equal":
        assert ref.tolist() == [list(range(18))] * 2


def test_select_wrapper_rejects_nonfinite():
    attn, info = _scores(1, 10, seed=0)
    attn[0, 2] = float("nan")
    with pytest.raises(ValueError, match="attn holds NaN or Inf"):
        tk.select(attn, info, 4)
