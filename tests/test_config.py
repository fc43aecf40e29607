"""Configuration: errors name the file and key; environment overrides; relative rule packs."""

import pytest

from milliwatt import ConfigError, Milliwatt
from milliwatt.cli import main
from milliwatt.config import load_settings


def test_defaults_run_the_four_tiers_offline():
    s = load_settings()
    assert s.tiers == ["rules", "cache", "local", "remote"]
    assert s.frontier_model == "openai/gpt-4o"


def test_unknown_key_names_file_and_key(tmp_path):
    cfg = tmp_path / "mw.yaml"
    cfg.write_text("frontier_model: openai/gpt-4o\ntrim:\n  keep_tool_resluts: 2\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert str(cfg) in str(err.value) and "trim.keep_tool_resluts" in str(err.value)


def test_unparsable_file_and_missing_file(tmp_path):
    bad = tmp_path / "mw.toml"
    bad.write_text("tiers = [\n")
    with pytest.raises(ConfigError, match="mw.toml: cannot parse"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_settings(tmp_path / "absent.yaml")


def test_unknown_tier_name_is_a_config_error():
    with pytest.raises(ConfigError, match="tiers: oracle"):
        Milliwatt.from_config({"tiers": ["rules", "oracle"], "ledger": None})


def test_environment_configures_the_remote_provider(monkeypatch):
    monkeypatch.setenv("MILLIWATT_REMOTE_MODEL", "anthropic/claude-3-5-sonnet-20241022")
    monkeypatch.setenv("MILLIWATT_LEDGER", "sqlite:///x.db")
    s = load_settings({"remote": {"timeout_s": 5}})
    assert (s.remote.timeout_s, s.remote.model) == (5, "anthropic/claude-3-5-sonnet-20241022")
    assert s.ledger == "sqlite:///x.db"


def test_rule_packs_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "packs").mkdir()
    cfg = tmp_path / "mw.yaml"
    cfg.write_text("rules:\n  packs: [packs]\n")
    assert load_settings(cfg).rules.packs == [str(tmp_path / "packs")]


def test_rules_check_cli_reports_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pack: t\nrules:\n  - id: a\n    when: {regex: '(unclosed'}\n    reply: hi\n")
    assert main(["rules", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:4" in err
    # With nothing named and no packs configured, there is nothing to check: said, not passed.
    assert main(["rules", "check"]) == 2
    good = tmp_path / "good.yaml"
    good.write_text("pack: t\nrules:\n  - id: a\n    when: {keywords: {any: [ping]}}\n    reply: pong\n")
    cfg = tmp_path / "mw.yaml"
    cfg.write_text("rules:\n  packs: good.yaml\n")
    assert main(["rules", "check", "--config", str(cfg)]) == 0


def test_a_cache_section_keeps_persistence_unless_it_says_otherwise():
    cache = load_settings({"cache": {"max_wrong": 0.05}}).cache
    assert (cache.path, cache.max_wrong) == (".milliwatt/cache", 0.05)
    assert load_settings({"cache": {"path": None}}).cache.path is None


def test_the_removed_cosine_threshold_is_refused_with_what_replaced_it():
    with pytest.raises(ConfigError, match=r"cache\.threshold is gone: a calibrated gate decides hits, bounded by cache\.max_wrong"):
        load_settings({"cache": {"threshold": 0.92}})


def test_cpu_watts_must_be_ordered():
    with pytest.raises(ConfigError, match="energy"):
        load_settings({"energy": {"cpu_watts_low": 5}})


def test_a_single_rule_pack_path_is_relative_to_the_config_file(tmp_path):
    cfg = tmp_path / "mw.yaml"
    cfg.write_text("rules:\n  packs: my.yaml\n")
    assert load_settings(cfg).rules.packs == [str(tmp_path / "my.yaml")]


def test_a_frontier_model_ecologits_does_not_know_is_refused_at_start():
    with pytest.raises(ConfigError, match="frontier_model"):
        Milliwatt.from_config({"frontier_model": "ollama/llama3", "tiers": ["rules"], "ledger": None})


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"cache": {"max_wrong": 2}}, "cache.max_wrong"),
        ({"cache": {"shadow_share": -0.1}}, "cache.shadow_share"),
        ({"cache": {"max_entries": "many"}}, "cache.max_entries"),
        ({"cache": {"treshold": 0.9}}, "cache.treshold"),
        ({"local": {"quantile": 2}}, "local.quantile"),
        ({"local": {"futility": {"window": 0}}}, "local.futility.window"),
        ({"local": {"futility": {"probe_every": 200}}}, "local.futility: Value error, max_probe_every (160) is below probe_every (200)"),
        ({"local": {"pregate": {"k": 0}}}, "local.pregate.k"),
        ({"local": {"copy_values": "maybe"}}, "local.copy_values"),
        ({"remote": {"max_retries": -1}}, "remote.max_retries"),
        ({"remote": {"tier": "cache"}}, "remote.tier"),
        ({"tools": {"cancel_reservation": {"cache": "sometimes"}}}, "tools.cancel_reservation.cache"),
    ],
)
def test_every_tier_setting_is_typed_and_named_on_error(data, key):
    with pytest.raises(ConfigError) as err:
        load_settings(data)
    assert f"settings: {key}" in str(err.value)


def test_tool_policy_reaches_the_cache_and_local_answers_are_not_written_back_by_default():
    from milliwatt.registry import build_tier

    s = load_settings({"tools": {"cancel_reservation": {"cache": "never"}, "get_user_details": {"cache": "read_only"}},
                       "cache": {"path": None}})
    assert s.tool_cache_policy() == {"cancel_reservation": "never", "get_user_details": "read_only"}
    assert build_tier("cache", s).read_only.policy == {"cancel_reservation": "never", "get_user_details": "read_only"}
    assert s.local.write_back is False
    assert load_settings({"local": {"write_back": True}}).local.write_back is True
