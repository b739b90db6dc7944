"""Shared fixtures: reference data, databases (SQLite and a real PostgreSQL server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from db.testing import PostgresUnavailable, TemporaryPostgres, create_database

REPO = Path(__file__).resolve().parents[1]


def rattled_waters(n: int, seed: int = 0):
    """``n`` distinct water molecules (positions rattled by 0.05 Å)."""
    import numpy as np
    from ase.build import molecule

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        a = molecule("H2O")
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        images.append(a)
    return images


TINY = {"channels": 4, "n_layers": 1, "radial_hidden": 8, "l_max": 1}  # fast test models


def ethanol_campaign(folder, shared_data, *, name="eth", n_pool=40, n_test=6, **overrides):
    """Pool/test files from the shared ethanol data and a campaign YAML (replay labels)."""
    import ase.io
    import yaml

    pool = ase.io.read(shared_data / "ethanol" / "train.xyz", f":{n_pool}")
    test = ase.io.read(shared_data / "ethanol" / "test_MD.xyz", f":{n_test}")
    ase.io.write(folder / "pool.xyz", pool)
    ase.io.write(folder / "test.xyz", test)
    cfg = {"name": name, "seed": 0,
           "data": {"pool_files": ["pool.xyz"], "initial_random": 6,
                    "test_files": ["test.xyz"]},
           "members": 2, "model": TINY, "train": {"max_epochs": 3, "batch_size": 4},
           "acquisition": {"batch_size": 4, "selection": "diverse"},
           "labeler": {"kind": "replay", "method": "pbe", "basis": "def2-svp",
                       "replay_files": ["pool.xyz", "test.xyz"], "workers": 2},
           "stop": {"max_rounds": 3}}
    for key, value in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def shared_data_dir() -> Path | None:
    """``$BAYESAL_SHARED_DATA`` or ``../shared/data`` beside the checkout, if present."""
    env = os.environ.get("BAYESAL_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared reference data not found: set BAYESAL_SHARED_DATA to its folder")
    return path


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
    from db import make_engine, upgrade

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
