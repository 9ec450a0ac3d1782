from pathlib import Path

import pytest

from mining.settings import Secret, SettingsError, load_settings


def test_env_values_are_typed_and_validated(tmp_path: Path) -> None:
    s = load_settings(env={
        "MINING_HOME": str(tmp_path),
        "MINING_WATCH_LIST": "EarthPorn, SkyPorn",
        "MINING_MIN_WIDTH": "800",
        "MINING_ALLOW_NSFW": "yes",
        "MINING_ALLOWED_HOSTS": "127.0.0.1,10.0.0.0/8",
    })
    assert s.home == tmp_path
    assert s.watch_list == ("EarthPorn", "SkyPorn")
    assert s.min_width == 800 and s.allow_nsfw is True
    assert s.allowed_hosts == ("127.0.0.1", "10.0.0.0/8")
    assert s.all_sources == ("all", "EarthPorn", "SkyPorn")


@pytest.mark.parametrize(("var", "value", "needle"), [
    ("MINING_MIN_WIDTH", "wide", "MINING_MIN_WIDTH"),
    ("MINING_REDDIT_BASE_URL", "ftp://x", "MINING_REDDIT_BASE_URL"),
    ("MINING_WATCH_LIST", "bad name!", "MINING_WATCH_LIST"),
    ("MINING_ALLOWED_HOSTS", "10.0.0.0/99", "MINING_ALLOWED_HOSTS"),
    ("MINING_PUBLISHER", "ftp", "MINING_PUBLISHER"),
])
def test_bad_values_name_the_variable(var: str, value: str, needle: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=needle):
        load_settings(env={"MINING_HOME": str(tmp_path), var: value})


def test_secret_never_prints(tmp_path: Path) -> None:
    s = load_settings(env={"MINING_HOME": str(tmp_path), "REDDIT_CLIENT_ID": "id",
                           "REDDIT_CLIENT_SECRET": "hunter2-planted"})
    assert s.oauth and s.api_base_url == "https://oauth.reddit.com" and s.budget_per_minute == 100
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.reddit_client_secret)
    assert isinstance(s.reddit_client_secret, Secret) and s.reddit_client_secret.value == "hunter2-planted"


def test_anonymous_defaults(tmp_path: Path) -> None:
    s = load_settings(env={"MINING_HOME": str(tmp_path)})
    assert not s.oauth and s.api_base_url == "https://www.reddit.com" and s.budget_per_minute == 10


def test_toml_file_then_env_wins(tmp_path: Path) -> None:
    cfg = tmp_path / "mining.toml"
    cfg.write_text('[mining]\nmin_width = 640\nwatch_list = ["SkyPorn"]\n')
    s = load_settings(env={"MINING_HOME": str(tmp_path), "MINING_CONFIG": str(cfg), "MINING_MIN_WIDTH": "700"})
    assert s.min_width == 700 and s.watch_list == ("SkyPorn",)
    cfg.write_text('[mining]\nno_such = 1\n')
    with pytest.raises(SettingsError, match="unknown setting"):
        load_settings(env={"MINING_HOME": str(tmp_path), "MINING_CONFIG": str(cfg)})


def test_replace_validates(tmp_path: Path) -> None:
    s = load_settings(env={"MINING_HOME": str(tmp_path)})
    assert s.replace(dry_run=True).dry_run
    with pytest.raises(SettingsError):
        s.replace(novelty_target_recall=1.5)
