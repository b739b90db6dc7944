"""Shared fixtures: reference data, databases (SQLite and a real PostgreSQL server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import shared_data_dir
from pg_server import PostgresUnavailable, TemporaryPostgres, create_database


@pytest.fixture(autouse=True)
def _bayesal_environment_is_per_test():
    """`bayesal --database-url X` exports X for the rest of its process (so every step of a
    command uses it); commands invoked in-process by a test must not leak it into the next."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("BAYESAL_")}
    yield
    for key in [k for k in os.environ if k.startswith("BAYESAL_") and k not in saved]:
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The reference DFT data (bayesal.datasets): always there, nothing is skipped."""
    return shared_data_dir()


@pytest.fixture(scope="session")
def pg_server():
    """URL of a PostgreSQL server: $BAYESAL_TEST_POSTGRES_URL, or a private one started here.

    Without PostgreSQL binaries the tests that need it are skipped, unless
    BAYESAL_REQUIRE_POSTGRES=1 (set by .ci/run), which turns the skip into a failure.
    """
    url = os.environ.get("BAYESAL_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    try:
        server = TemporaryPostgres().start()
    except PostgresUnavailable as exc:
        if os.environ.get("BAYESAL_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL required but unavailable: {exc}")
        pytest.skip(str(exc))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server) -> str:
    """A fresh, empty PostgreSQL database."""
    return create_database(pg_server)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'bayesal.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """An empty database URL, once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bayesal.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def engine(db_url):
    from bayesal.db import make_engine, upgrade

    eng = make_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect server for the session; its URL for subprocesses."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()
