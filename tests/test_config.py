"""spaces.yaml validation: key-path errors, unknown keys, env overrides, sizes."""

from __future__ import annotations

import pytest
import yaml

from coe_core.config import config_from_dict, load_config, parse_size
from coe_core.errors import ConfigError
from tests.conftest import REPO, write_yaml


def shipped() -> dict:
    return yaml.safe_load((REPO / "spaces.yaml").read_text())


def test_shipped_config_is_valid_and_offline_by_default():
    config = load_config(REPO / "spaces.yaml", env=False)
    assert config.profile == "offline"
    assert set(config.experts) == {"smollm2-135m", "gemma3-270m"}
    assert config.all_categories[-1] == "general" and len(config.categories) == 8
    assert "hub" in config.profiles and config.profiles["hub"].experts


def test_unknown_key_names_the_key_path(tmp_path):
    raw = shipped()
    raw["profiles"]["offline"]["experts"]["smollm2-135m"]["sorce"] = "typo"
    with pytest.raises(ConfigError, match=r"profiles\.offline\.experts\.smollm2-135m\.sorce: unknown key"):
        load_config(write_yaml(tmp_path / "s.yaml", raw), env=False)


def test_bad_values_say_how_to_fix_them():
    raw = shipped()
    raw["profiles"]["offline"]["experts"]["gemma3-270m"]["source"] = "ftp:somewhere"
    raw["tiers"]["cpu"]["budget"] = "lots"
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, env=False)
    text = str(err.value)
    assert "profiles.offline.experts.gemma3-270m.source" in text and "hf:, dir:, gguf:, package: or openai:" in text
    assert "tiers.cpu.budget" in text and "512MB" in text


def test_default_expert_and_overrides_are_checked():
    raw = shipped()
    raw["profiles"]["offline"]["default_expert"] = "nope"
    with pytest.raises(ConfigError, match="default_expert 'nope' is not one of the experts"):
        config_from_dict(raw, env=False)
    raw = shipped()
    raw["mapping"]["overrides"] = {"coding": "missing-expert"}
    with pytest.raises(ConfigError, match="unknown expert 'missing-expert'"):
        config_from_dict(raw, env=False)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("profiles: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of keys"):
        load_config(tmp_path / "list.yaml")


def test_environment_overrides_paths_budgets_and_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("COE_PROFILE", "hub")
    monkeypatch.setenv("COE_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("COE_CPU_BUDGET", "1.5GB")
    monkeypatch.setenv("COE_DATABASE_URL", "sqlite:///x.db")
    monkeypatch.setenv("COE_MAPPING_BUDGET", "300M")
    config = load_config(REPO / "spaces.yaml")
    assert config.profile == "hub" and "qwen2.5-1.5b-instruct" in config.experts
    assert config.data_path == tmp_path / "d"
    assert config.tiers.cpu.budget == 1_500_000_000
    assert config.database_url == "sqlite:///x.db"
    assert config.mapping.budget == 300_000_000
    monkeypatch.setenv("COE_PROFILE", "nonexistent")
    with pytest.raises(ConfigError, match="profile 'nonexistent' is not defined"):
        load_config(REPO / "spaces.yaml")


@pytest.mark.parametrize(
    "text, value",
    [
        ("512MB", 512 * 10**6),
        ("2GB", 2 * 10**9),
        ("1.5GiB", int(1.5 * 2**30)),
        ("300M", 300 * 10**6),
        (1234, 1234),
        ("77", 77),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_nonsense():
    with pytest.raises(ValueError, match="is not a size"):
        parse_size("12 parsecs")
