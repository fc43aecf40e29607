"""The remote tier and the frontier model are checked at start: missing credentials name the
variable to set, and a frontier model litellm cannot price is refused, naming the setting.
Prices come from litellm's public API."""

from __future__ import annotations

import pytest

from milliwatt import ConfigError, Milliwatt
from milliwatt._offline import import_litellm
from milliwatt.adapters.litellm_backend import LiteLLMBackend

PROVIDER_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")


@pytest.fixture(autouse=True)
def no_provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROVIDER_KEYS:
        monkeypatch.delenv(name, raising=False)
    for name in ("MILLIWATT_REMOTE_MODEL", "MILLIWATT_REMOTE_API_BASE", "MILLIWATT_REMOTE_API_KEY_ENV", "MILLIWATT_FRONTIER_MODEL"):
        monkeypatch.delenv(name, raising=False)


def config(**remote: object) -> dict:
    return {"tiers": ["remote"], "ledger": None, "remote": dict(remote)}


# --------------------------------------------------------------------------- credentials


def test_a_missing_provider_key_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError) as err:
        Milliwatt.from_config(config(model="openai/gpt-4o"))
    assert err.value.where == "remote.model"
    assert "OPENAI_API_KEY" in err.value.problem and "openai/gpt-4o" in err.value.problem
    assert "remote.api_key_env" in err.value.problem and "remote.api_base" in err.value.problem


def test_the_default_remote_model_is_the_frontier_and_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        Milliwatt.from_config({"tiers": ["remote"], "ledger": None})


def test_another_provider_names_its_own_variable() -> None:
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        Milliwatt.from_config(config(model="anthropic/claude-3-5-sonnet-20240620", energy_model="openai/gpt-4o"))


def test_an_unset_api_key_env_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        Milliwatt.from_config(config(model="openai/gpt-4o", api_key_env="MW_TEST_UNSET_KEY"))
    assert err.value.where == "remote.api_key_env" and "MW_TEST_UNSET_KEY" in err.value.problem


@pytest.mark.parametrize(
    "remote",
    [
        {"model": "openai/gpt-4o", "api_base": "http://127.0.0.1:9/v1"},  # a local server needs no key
        {"model": "openai/gpt-4o", "api_key": "sk-test-not-a-real-key"},
        {"model": "openai/gpt-4o", "api_key_env": "MW_TEST_KEY"},
    ],
    ids=["api_base", "api_key", "api_key_env"],
)
def test_configured_credentials_start(monkeypatch: pytest.MonkeyPatch, remote: dict) -> None:
    monkeypatch.setenv("MW_TEST_KEY", "sk-test-from-the-environment")
    mw = Milliwatt.from_config(config(**remote))
    assert mw.tier("remote").backend.model == "openai/gpt-4o"


def test_a_key_in_the_environment_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-from-the-environment")
    Milliwatt.from_config(config(model="openai/gpt-4o"))


def test_a_litellm_custom_provider_needs_no_key() -> None:
    import_litellm()
    from milliwatt.evaluation.replay_provider import PROVIDER, provider

    provider()  # registered in litellm.custom_provider_map, as a replay does
    mw = Milliwatt.from_config(config(model=f"{PROVIDER}/gpt-4o", energy_model="openai/gpt-4o"))
    assert mw.tier("remote").backend.model == f"{PROVIDER}/gpt-4o"


def test_check_names_the_variable_without_a_client() -> None:
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        LiteLLMBackend("openai/gpt-4o").check()
    LiteLLMBackend("openai/gpt-4o", api_base="http://127.0.0.1:9/v1").check()


# --------------------------------------------------------------------------- prices


def test_an_unpriced_frontier_model_is_refused_at_start_naming_the_setting() -> None:
    with pytest.raises(ConfigError) as err:
        Milliwatt.from_config({"frontier_model": "openai/gpt-99", "tiers": ["rules"], "ledger": None})
    assert err.value.where == "frontier_model"
    assert "litellm has no price for 'openai/gpt-99'" in err.value.problem
    assert "set frontier_model to a priced model" in err.value.problem


def test_require_price_refuses_rather_than_pricing_at_zero() -> None:
    from milliwatt.pricing import cost_usd, require_price

    with pytest.raises(ConfigError, match="frontier_model: litellm has no price for 'openai/gpt-99'"):
        require_price("openai/gpt-99")
    with pytest.raises(ConfigError, match="baseline_model"):
        require_price("openai/gpt-99", "baseline_model")
    # A stand-in that answers may be unpriced: it costs nothing known.
    assert cost_usd("openai/a-local-stand-in", 1000, 100) == 0.0


def test_prices_come_from_litellms_public_api(monkeypatch: pytest.MonkeyPatch) -> None:
    litellm = import_litellm()
    from milliwatt.pricing import Price, price, require_price

    info = litellm.get_model_info("openai/gpt-4o")
    assert price("openai/gpt-4o") == Price(
        "openai/gpt-4o", info["input_cost_per_token"], info["output_cost_per_token"], info["cache_read_input_token_cost"]
    )
    # A model registered with litellm at run time (not in its bundled file) is priced through it.
    monkeypatch.setattr(litellm, "model_cost", dict(litellm.model_cost))
    litellm.register_model(
        {"mw-test-priced-model": {"input_cost_per_token": 1e-6, "output_cost_per_token": 3e-6, "litellm_provider": "openai", "mode": "chat"}}
    )
    p = require_price("openai/mw-test-priced-model")
    assert (p.input_per_token, p.output_per_token) == (1e-6, 3e-6)
    assert p.cost(1000, 100) == pytest.approx(1000 * 1e-6 + 100 * 3e-6)


def test_prices_can_be_loaded_from_a_worker_thread() -> None:
    import concurrent.futures

    from milliwatt import pricing

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        found = list(pool.map(pricing.price, ["openai/gpt-4o", "openai/gpt-4o-mini", "openai/gpt-4o", "gpt-4o"]))
    assert all(p is not None and p.input_per_token > 0 for p in found)
    pricing.load("openai/gpt-4o-mini")  # kept: no second look-up
    assert pricing.price("openai/gpt-4o-mini") is found[1]
