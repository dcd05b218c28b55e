"""Where the plugin's budget comes from (hf_overrides, then TOKENCARVE_VLLM_BUDGET) and what it refuses."""

import types

import pytest

from tokencarve_kernels.integrations.vllm import BUDGET_ENV, budget_for, env_budget


def test_config_key_wins_over_environment(monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "128")
    assert budget_for(types.SimpleNamespace(tokencarve_budget=64)) == 64
    assert budget_for(types.SimpleNamespace(tokencarve_budget=0)) == 0  # off for this model
    assert budget_for(types.SimpleNamespace()) == 128


def test_unset_means_off(monkeypatch):
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    assert env_budget() == 0 and budget_for(types.SimpleNamespace()) == 0


@pytest.mark.parametrize("raw", ["-1", "12.5", "lots", ""])
def test_bad_environment_value_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv(BUDGET_ENV, raw)
    with pytest.raises(ValueError, match=f"TOKENCARVE_VLLM_BUDGET must be a non-negative integer .*got {raw!r}"):
        env_budget()


@pytest.mark.parametrize("value", [-3, 64.0, True, "sixty"])
def test_bad_config_value_names_the_key(value):
    with pytest.raises(ValueError, match=r"hf_overrides\['tokencarve_budget'\] must be a non-negative integer"):
        budget_for(types.SimpleNamespace(tokencarve_budget=value))
