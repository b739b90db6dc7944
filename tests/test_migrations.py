"""Migrations create the ORM's schema, identically on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from bayesal.db import SchemaOutOfDate, ensure_schema, head_revision, make_engine, upgrade
from bayesal.db.engine import current_revision
from bayesal.db.models import Base

TABLES = {"campaigns", "structures", "labeler_settings", "labels", "rounds", "models", "scores"}
VIEWS = {"labelled_data", "round_summary", "label_failures"}


def schema(url: str) -> dict[str, set[str]]:
    engine = make_engine(url)
    try:
        upgrade(engine)
        insp = inspect(engine)
        out = {t: {c["name"] for c in insp.get_columns(t)} for t in insp.get_table_names()}
        out.update({v: {c["name"] for c in insp.get_columns(v)} for v in insp.get_view_names()})
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
        assert diff == [], f"migrations and ORM models disagree: {diff}"
        return out
    finally:
        engine.dispose()


def test_sqlite_schema_matches_models(sqlite_url):
    s = schema(sqlite_url)
    assert TABLES | VIEWS | {"alembic_version"} == set(s)


@pytest.mark.postgres
def test_sqlite_and_postgres_schemas_are_identical(sqlite_url, pg_url):
    assert schema(sqlite_url) == schema(pg_url)


def test_downgrade_and_upgrade_again(db_url):
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        upgrade_to = head_revision()
        from alembic import command

        from bayesal.db.engine import alembic_config

        command.downgrade(alembic_config(engine), "base")
        assert current_revision(engine) is None
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert upgrade(engine) == upgrade_to
    finally:
        engine.dispose()


def test_missing_schema_names_the_command(sqlite_url):
    engine = make_engine(sqlite_url)
    try:
        with pytest.raises(SchemaOutOfDate, match="bayesal db upgrade"):
            ensure_schema(engine)
        ensure_schema(engine, create=True)
        ensure_schema(engine)
    finally:
        engine.dispose()
