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
VIEWS = {"labelled_data", "round_summary", "label_failures", "label_levels"}


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


def test_0002_fills_labels_campaign_id_from_their_structures(db_url):
    """A database with labels goes down to 0001 (no labels.campaign_id) and up again: every
    label gets its structure's campaign, and the views return what they returned."""
    import dashboard_fixture as fx
    from alembic import command
    from sqlalchemy import text

    from bayesal.db.engine import alembic_config

    engine = make_engine(db_url)
    try:
        upgrade(engine)
        fx.build_demo(engine)
        queries = ("SELECT campaign, label_id FROM labelled_data ORDER BY label_id",
                   "SELECT label_id, status FROM label_failures ORDER BY label_id",
                   "SELECT campaign, round_index, n_ok, n_failed FROM round_summary "
                   "ORDER BY campaign, round_index")
        with engine.connect() as conn:
            before = [conn.execute(text(q)).all() for q in queries]
        command.downgrade(alembic_config(engine), "0001")
        assert "campaign_id" not in {c["name"] for c in inspect(engine).get_columns("labels")}
        assert upgrade(engine) == head_revision()
        with engine.connect() as conn:
            wrong = conn.execute(text(
                "SELECT COUNT(*) FROM labels l JOIN structures s ON s.id = l.structure_id "
                "WHERE l.campaign_id IS NULL OR l.campaign_id <> s.campaign_id")).scalar()
            after = [conn.execute(text(q)).all() for q in queries]
            n = conn.execute(text("SELECT COUNT(*) FROM labels")).scalar()
        assert wrong == 0 and n == 13 and after == before
    finally:
        engine.dispose()
