"""The evaluation's methods keep their one contract: [1, T, D] states at ascending original positions."""

import pytest
import torch

from benchmarks import eval_methods
from tests.inputs import attention_scores, hidden_states


@pytest.mark.parametrize("name", list(eval_methods.METHODS))
def test_every_method_returns_budget_tokens_in_order(name):
    hidden, attn = hidden_states(1, 100, 32, seed=1), attention_scores(1, 100, seed=1)
    carved, keep_idx = eval_methods.METHODS[name](hidden, attn, 24)
    assert carved.shape == (1, 24, 32) and keep_idx.shape == (1, 24)
    assert torch.equal(keep_idx, keep_idx.sort(dim=1).values) and keep_idx.unique().numel() == 24


def test_bipartite_merge_folds_duplicates_first():
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    hidden = base.repeat_interleave(2, dim=0)[None]  # every token has an identical twin next to it
    carved, keep_idx = eval_methods.bipartite_merge(hidden, torch.ones(1, 12), 6)
    assert keep_idx.tolist() == [[0, 2, 4, 6, 8, 10]]
    torch.testing.assert_close(carved[0], base)


def test_diversity_picks_the_outliers():
    hidden = torch.zeros(1, 10, 3)
    hidden[0, :, 0] = 1.0
    hidden[0, 3] = torch.tensor([0.0, 1.0, 0.0])
    hidden[0, 7] = torch.tensor([0.0, 0.0, 1.0])
    _, keep_idx = eval_methods.diversity(hidden, torch.ones(1, 10), 3)
    assert {3, 7} <= set(keep_idx[0].tolist())


def test_spectrum_share_is_one_for_everything_and_less_for_a_part():
    hidden = hidden_states(1, 40, 16, seed=2)
    assert eval_methods.spectrum_share(hidden, hidden) == pytest.approx(1.0)
    assert eval_methods.spectrum_share(hidden, hidden[:, :10]) < 1.0


@pytest.mark.parametrize("name", list(eval_methods.METHODS))
def test_every_method_keeps_everything_at_a_budget_of_all_tokens(name):
    """The harness's keep-all check rests on this: budget >= Nv returns the input, in order."""
    hidden, attn = hidden_states(1, 30, 16, seed=4), attention_scores(1, 30, seed=4)
    for budget in (30, 45):
        carved, keep_idx = eval_methods.METHODS[name](hidden, attn, budget)
        assert keep_idx.tolist() == [list(range(30))]
        torch.testing.assert_close(carved, hidden, rtol=0, atol=0)


def test_methods_reseed_only_their_random_draws():
    # D = 160 > rank 64 and a slow spectral decay: the rank-64 sketch is an approximation and its seed matters
    hidden, attn = hidden_states(1, 200, 160, seed=5, decay=1.0), attention_scores(1, 200, seed=5)
    first, second = eval_methods.methods(seed=1), eval_methods.methods(seed=2)
    assert not torch.equal(first["random"](hidden, attn, 20)[1], second["random"](hidden, attn, 20)[1])
    assert torch.equal(first["random"](hidden, attn, 20)[1], eval_methods.methods(seed=1)["random"](hidden, attn, 20)[1])
    for name in ("tokencarve-rand64", "tokencarve-rand64-similarity"):
        ours = first[name](hidden, attn, 20)
        assert not torch.equal(ours[1], second[name](hidden, attn, 20)[1]), name
        theirs = eval_methods.tokencarve(rank=64, merge=name.removeprefix("tokencarve-rand64").lstrip("-") or "mean",
                                         seed=1)(hidden, attn, 20)
        assert torch.equal(ours[1], theirs[1]) and torch.equal(ours[0], theirs[0])
    for name in ("tokencarve", "no-merge", "diversity (DivPrune-like)", "bipartite merge (ToMe-like)"):
        assert torch.equal(first[name](hidden, attn, 20)[1], second[name](hidden, attn, 20)[1]), name
