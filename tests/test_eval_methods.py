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
