from __future__ import annotations

import pytest

from bayesal.flows.settings import SettingsError, load_settings


def test_defaults(monkeypatch):
    for var in ("BAYESAL_DATABASE_URL", "BAYESAL_DATA_DIR", "BAYESAL_LOG_LEVEL"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings()
    assert s.database_url == "sqlite:///bayesal.db"
    assert str(s.data_dir) == "bayesal-data" and s.log_level == "INFO"


def test_environment_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("BAYESAL_DATABASE_URL", "postgresql+psycopg://u:p@db:5432/al")
    monkeypatch.setenv("BAYESAL_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BAYESAL_LOG_LEVEL", "debug")
    s = load_settings()
    assert s.database_url.startswith("postgresql") and s.data_dir == tmp_path
    assert s.log_level == "DEBUG"


@pytest.mark.parametrize("var,value,needle", [
    ("BAYESAL_DATABASE_URL", "mysql://x/y", "not supported"),
    ("BAYESAL_DATABASE_URL", "::not a url::", "invalid database URL"),
    ("BAYESAL_LOG_LEVEL", "loud", "DEBUG"),
])
def test_invalid_settings_name_the_variable(monkeypatch, var, value, needle):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert var in str(info.value) and needle in str(info.value)
