"""docker-compose.yml cannot run here (no Docker engine); check what can be checked."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]


def _default(value: str) -> str:
    """Resolve compose's ``${VAR:-default}`` to its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_compose_postgres_matches_documented_database_url():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    pg = compose["services"]["postgres"]
    env = {k: _default(v) for k, v in pg["environment"].items()}
    host, port = re.match(r"(.+):(\d+):5432", _default(pg["ports"][0])).groups()
    assert host == "127.0.0.1"  # never exposed beyond loopback by default
    readme = (REPO / "README.md").read_text()
    documented = re.search(r"(postgresql\+psycopg://\S+@127\.0\.0\.1:\d+/\w+)", readme).group(1)
    url = make_url(documented)
    assert (url.username, url.password, url.database, url.port) == (
        env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"], int(port))
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
