"""info_scores: the reference's exact and randomized paths against the definition, then the op."""

import pytest
import torch

import python_ref
import tokencarve_kernels as tk
from tests.inputs import attention_scores, hidden_states, rel_err

SHAPES = [(1, 1, 8), (3, 7, 5), (2, 64, 33), (2, 40, 96), (1, 130, 24)]  # Nv < D, Nv > D, Nv = 1


def _svd64(hidden):
    return python_ref.info_scores_svd(hidden.double())


# ---- the reference against the definition ----

@pytest.mark.parametrize("batch, nv, dim", SHAPES, ids=lambda v: str(v))
def test_gram_path_equals_fp64_svd(batch, nv, dim):
    hidden = hidden_states(batch, nv, dim, seed=nv + dim, dtype=torch.float64)
    assert rel_err(python_ref.info_scores_gram(hidden), _svd64(hidden)) < 1e-6


def test_exact_paths_select_what_fp64_svd_selects():
    # A decaying spectrum squares badly in a Gram matrix; computed in float64 the selection must not move.
    hidden = hidden_states(2, 576, 1024, seed=11, decay=7.0)
    attn = attention_scores(2, 576, seed=11)
    ref = python_ref.select(attn, _svd64(hidden).float(), 128)
    assert torch.equal(python_ref.select(attn, python_ref.info_scores_gram(hidden).float(), 128), ref)
    assert torch.equal(python_ref.select(attn, tk.info_scores(hidden), 128), ref)


def test_authors_baseline_is_the_same_score():
    hidden = hidden_states(1, 50, 80, seed=2, decay=2.0)
    assert rel_err(python_ref.authors_info_scores(hidden), _svd64(hidden)) < 1e-4


@pytest.mark.parametrize("batch, nv, dim", [(2, 40, 24), (1, 24, 40), (1, 33, 33)], ids=lambda v: str(v))
def test_randomized_becomes_exact_at_full_rank(batch, nv, dim):
    hidden = hidden_states(batch, nv, dim, seed=3, dtype=torch.float64)
    full = python_ref.info_scores_randomized(hidden, rank=min(nv, dim), seed=5)
    assert rel_err(full, _svd64(hidden)) < 1e-6
    partial = python_ref.info_scores_randomized(hidden, rank=min(nv, dim) // 4, seed=5)
    assert rel_err(partial, _svd64(hidden)) > 1e-3  # a true approximation below full rank


def test_randomized_seed_is_deterministic_and_matters():
    hidden = hidden_states(2, 96, 64, seed=4)
    a = python_ref.info_scores(hidden, rank=8, seed=1)
    assert torch.equal(a, python_ref.info_scores(hidden, rank=8, seed=1))
    assert not torch.equal(a, python_ref.info_scores(hidden, rank=8, seed=2))
    assert not torch.equal(python_ref.gaussian_sketch(1, 64, 24), python_ref.gaussian_sketch(2, 64, 24))


def test_gaussian_sketch_is_standard_normal():
    omega = python_ref.gaussian_sketch(123, 256, 64).double()
    assert abs(omega.mean().item()) < 0.02 and abs(omega.std().item() - 1.0) < 0.02


def test_nonfinite_rows_score_nan_and_others_as_if_zero():
    hidden = hidden_states(1, 20, 12, seed=6)
    bad = hidden.clone()
    bad[0, 3, 5] = float("nan")
    bad[0, 7, 0] = float("-inf")
    zeroed = hidden.clone()
    zeroed[0, [3, 7]] = 0.0
    ref = python_ref.info_scores(bad)
    assert ref[0, [3, 7]].isnan().all()
    keep = [i for i in range(20) if i not in (3, 7)]
    torch.testing.assert_close(ref[0, keep], python_ref.info_scores(zeroed)[0, keep])
    torch.testing.assert_close(tk.info_scores(bad, check_finite=False), ref, equal_nan=True)
    with pytest.raises(ValueError, match="hidden holds NaN or Inf"):
        tk.info_scores(bad)


# ---- the op against the reference ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("batch, nv, dim", SHAPES, ids=lambda v: str(v))
def test_exact_op_matches_reference(batch, nv, dim, dtype):
    hidden = hidden_states(batch, nv, dim, seed=nv * dim, dtype=dtype)
    out = tk.info_scores(hidden)
    assert out.dtype == torch.float32 and out.shape == (batch, nv)
    assert rel_err(out, _svd64(hidden)) < 1e-6  # the op upcasts to float64: only the float32 output rounds


@pytest.mark.parametrize("rank", [1, 4, 16])
@pytest.mark.parametrize("batch, nv, dim", [(3, 7, 5), (2, 64, 33), (2, 40, 96)], ids=lambda v: str(v))
def test_randomized_op_matches_reference(batch, nv, dim, rank):
    hidden = hidden_states(batch, nv, dim, seed=rank)
    out = tk.info_scores(hidden, rank=rank, seed=9)
    # Same Philox sketch; float64 algebra on both sides (LAPACK QR/eigh may differ in the last bits)
    assert rel_err(out, python_ref.info_scores(hidden, rank=rank, seed=9)) < 1e-5
    assert torch.equal(out, tk.info_scores(hidden, rank=rank, seed=9))
