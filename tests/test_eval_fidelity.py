"""The fidelity harness (benchmarks/eval_fidelity.py): its metrics, its adapter, and its quick mode end to end."""

import csv
import dataclasses
import math

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import eval_fidelity as ef  # noqa: E402
from benchmarks import eval_methods  # noqa: E402
from tests.inputs import attention_scores, hidden_states  # noqa: E402

CARVED_METHODS = set(eval_methods.METHODS) | {ef.EMBEDDING_STAGE, ef.EMBEDDING_STAGE_ORIGINAL_POSITIONS,
                                              ef.RANDOM_BEFORE_LLM}


# ------------------------------------------------------------------------------------------------ metrics by hand
def test_relative_error_by_hand():
    reference = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert ef.relative_error(reference, reference) == 0.0
    assert ef.relative_error(reference, torch.tensor([3.0, 0.0], dtype=torch.float64)) == pytest.approx(0.8)


def test_kl_divergence_by_hand():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64).log()
    q = torch.tensor([0.9, 0.1], dtype=torch.float64).log()
    assert ef.kl_divergence(p, p) == 0.0
    assert ef.kl_divergence(p, q) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert ef.kl_divergence(q, p) != pytest.approx(ef.kl_divergence(p, q))   # KL(p_full || p_carved), not symmetric


def test_prefix_agreement_stops_at_the_first_disagreement():
    assert ef.prefix_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert ef.prefix_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5   # the 4 after the miss does not count
    assert ef.prefix_agreement([1, 2, 3, 4], [7, 2, 3, 4]) == 0.0


def test_summary_pairs_each_sample_with_tokencarve():
    def row(method, seed, kl):
        return {"method": method, "stage": "s", "budget": 64, "model_seed": seed, "image": 0, "prompt": 0,
                "rel_err": 0.1, "kl": kl, "top1": 1.0, "prefix": 0.5, "spectrum": math.nan}

    rows = [row("tokencarve", 0, 0.2), row("tokencarve", 1, 0.4), row("other", 1, 0.1), row("other", 0, 0.8)]
    by_method = {s["method"]: s for s in ef.summarise(rows)}
    other = by_method["other"]
    assert other["kl_mean"] == pytest.approx(0.45) and other["kl_std"] == pytest.approx(math.sqrt(2 * 0.35**2))
    assert other["kl_ratio_to_tokencarve"] == pytest.approx(math.sqrt(4.0 * 0.25))   # paired by sample, not by order
    assert other["kl_below_tokencarve"] == 1
    assert math.isnan(other["spectrum_mean"]) and other["n"] == 2
    assert by_method["tokencarve"]["kl_ratio_to_tokencarve"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ the adapter
def test_per_image_adapter_carves_each_image_alone():
    hidden = hidden_states(3, 40, 16, seed=3)
    attn = attention_scores(3, 40, seed=3)
    for name, method in eval_methods.METHODS.items():
        adapter = ef.PerImage(method)
        carved, keep_idx = adapter(hidden, attn, 10)
        assert carved.shape == (3, 10, 16) and keep_idx.shape == (3, 10), name
        for i in range(3):
            alone, alone_idx = method(hidden[i : i + 1], attn[i : i + 1], 10)
            torch.testing.assert_close(carved[i : i + 1], alone, rtol=0, atol=0, msg=name)
            assert torch.equal(keep_idx[i : i + 1], alone_idx), name
            assert adapter.shares[i] == pytest.approx(eval_methods.spectrum_share(hidden[i : i + 1], alone))
        assert len(adapter.shares) == 3


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def quick_rows():
    """The quick model and sample with every method at keep-all (576) and at 64 tokens."""
    return ef.evaluate(dataclasses.replace(ef.QUICK, budgets=(ef.NUM_VISUAL, 64)), log=lambda *_: None)


def test_keep_all_budget_leaves_every_method_exact(quick_rows):
    """Through the same harness, budget 576 keeps the model's output bit for bit: the harness adds no error."""
    keep_all = [r for r in quick_rows if r["method"] != ef.ANOTHER_IMAGE and r["budget"] == ef.NUM_VISUAL]
    assert {r["method"] for r in keep_all} == CARVED_METHODS
    for r in keep_all:
        assert (r["rel_err"], r["kl"], r["top1"], r["prefix"]) == (0.0, 0.0, 1.0, 1.0), r["method"]
        assert r["spectrum"] == pytest.approx(1.0), r["method"]


def test_carving_to_64_moves_the_output_less_than_another_image(quick_rows):
    """At 64 of 576 every method changes the output, and its spectrum share is a proper fraction; the model is not
    degenerate: another image moves the next-token distribution by a clear margin."""
    (other,) = [r for r in quick_rows if r["method"] == ef.ANOTHER_IMAGE]
    assert other["kl"] > 0.1 and other["rel_err"] > 0.1
    carved = [r for r in quick_rows if r["budget"] == 64]
    assert {r["method"] for r in carved} == CARVED_METHODS
    for r in carved:
        assert r["rel_err"] > 0.0 and r["kl"] > 0.0, r["method"]
        assert 0.0 < r["spectrum"] < 1.0, r["method"]
    # the in-LLM carve keeps layers 0-1 whole: in this model every in-LLM method stays closer than another image
    for r in carved:
        if r["stage"].startswith("LLM"):
            assert r["kl"] < other["kl"], r["method"]


def test_embedding_stage_reads_the_models_own_features():
    """vision_features returns what LLaVA feeds its LLM, and the [CLS] query / keys of the feature layer."""
    model = ef.build_model(ef.QUICK, 0)
    pixel_values = ef.synthetic_image(0)
    features, cls_query, keys, scale = ef.vision_features(model, pixel_values)
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        expected = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])
        layer = model.model.vision_tower.encoder.layers[model.config.vision_feature_layer]
        normed = layer.layer_norm1(hidden[model.config.vision_feature_layer - 1])
    heads = model.config.vision_config.num_attention_heads
    torch.testing.assert_close(features, expected)
    assert features.shape == (1, ef.NUM_VISUAL, model.config.text_config.hidden_size)
    assert cls_query.shape == (1, heads, keys.shape[-1]) and keys.shape[:3] == (1, heads, ef.NUM_VISUAL + 1)
    torch.testing.assert_close(keys.transpose(1, 2).flatten(2), layer.self_attn.k_proj(normed))
    torch.testing.assert_close(cls_query.flatten(1), layer.self_attn.q_proj(normed)[:, 0])
    assert scale == pytest.approx(keys.shape[-1] ** -0.5)


def test_quick_mode_writes_its_tables(tmp_path, capsys):
    path = tmp_path / "fidelity.csv"
    summary = ef.main(["--quick", "--csv", str(path)])
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "| 64 / 576 | tokencarve | LLM layer 2 |" in out
    with open(path) as f:
        written = list(csv.DictReader(f))
    assert [r["method"] for r in written] == [s["method"] for s in summary]
    assert {r["method"] for r in written} == CARVED_METHODS | {ef.ANOTHER_IMAGE}
    with open(tmp_path / "fidelity_samples.csv") as f:
        samples = list(csv.DictReader(f))
    assert len(samples) == len(written) and all(r["model"].startswith("random-weight LLaVA-1.5") for r in samples)
