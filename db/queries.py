"""Read-side queries: campaign status and the read-only SQL console."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from bayesal.db.engine import DatabaseError, readonly_engine
from bayesal.db.models import Campaign, Label, LabelStatus, Round, Structure

__all__ = [
    "QueryResult",
    "ReadOnlyViolation",
    "campaign_overview",
    "check_readonly_sql",
    "label_failures",
    "labels_by_status",
    "round_table",
    "run_readonly_sql",
    "structures_by_source",
]

# Statements the console accepts; the database's own read-only mode is the real guard.
_READ_KEYWORDS = {"select", "with", "values", "explain", "table", "show"}


class ReadOnlyViolation(DatabaseError):
    """A statement tried to change the database through the read-only console."""


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def _strip_literals(sql: str) -> str:
    """SQL with string literals, quoted identifiers and comments blanked out."""
    return re.sub(
        r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", " ", sql, flags=re.S
    )


def check_readonly_sql(sql: str) -> str:
    """Validate a console statement; returns it without a trailing semicolon.

    Refuses more than one statement and anything that does not start as a query.
    """
    stmt = sql.strip().rstrip(";").strip()
    bare = _strip_literals(stmt)
    if ";" in bare:
        raise ReadOnlyViolation("one statement at a time, please (found ';' inside the query)")
    words = bare.split()
    if not words:
        raise ReadOnlyViolation("empty query")
    keyword = words[0].lower()
    if keyword not in _READ_KEYWORDS:
        raise ReadOnlyViolation(
            f"`bayesal sql` is read-only and does not run {words[0].upper()} statements; "
            "it accepts queries (SELECT, WITH, VALUES, EXPLAIN, TABLE, SHOW). Change data with "
            "bayesal commands (import, run, ...) or a database client of your own."
        )
    return stmt


def run_readonly_sql(url: str, sql: str, *, max_rows: int | None = None) -> QueryResult:
    """Run one query on a read-only connection (the database refuses any write).

    The text check above is a courtesy; the guards are the database's: SQLite connections
    with ``query_only``, which run one statement per call; on PostgreSQL a transaction that
    starts READ ONLY and a statement sent through the extended protocol (prepared), which
    refuses a second statement, so nothing can end the read-only transaction and start
    another (``...; COMMIT; BEGIN READ WRITE; ...``)."""
    stmt = check_readonly_sql(sql)
    engine = readonly_engine(url)
    try:
        with engine.connect() as conn:
            try:
                if engine.dialect.name == "postgresql":
                    columns, rows = _postgres_one_statement(conn, stmt, max_rows)
                else:
                    result = conn.execute(text(stmt))
                    columns = list(result.keys())
                    rows = result.fetchmany(max_rows) if max_rows else result.fetchall()
            except DBAPIError as exc:
                msg = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
                _raise_refusal(msg)
            except Exception as exc:  # psycopg's own errors on the raw connection
                if type(exc).__module__.split(".")[0] != "psycopg":
                    raise
                _raise_refusal(str(exc).strip().splitlines()[0])
            conn.rollback()
    finally:
        engine.dispose()
    return QueryResult(columns, [tuple(r) for r in rows])


def _raise_refusal(msg: str) -> None:
    if any(word in msg for word in ("read-only", "readonly", "query_only",
                                    "multiple commands", "one statement")):
        raise ReadOnlyViolation(f"refused by the database: {msg}. `bayesal sql` is "
                                "read-only and runs one statement.") from None
    raise DatabaseError(f"query failed: {msg}") from None


def _postgres_one_statement(conn, stmt: str, max_rows: int | None):
    """One statement, prepared (extended protocol), in the connection's READ ONLY
    transaction (``default_transaction_read_only`` of :func:`readonly_engine`)."""
    raw = conn.connection.driver_connection  # psycopg 3
    threshold = raw.prepare_threshold  # None (make_engine) disables even prepare=True
    raw.prepare_threshold = 5
    try:
        with raw.cursor() as cur:
            cur.execute("SET TRANSACTION READ ONLY", prepare=False)
            cur.execute(stmt, prepare=True)
            columns = [d.name for d in cur.description or []]
            rows = (cur.fetchmany(max_rows) if max_rows else cur.fetchall()) if columns else []
    finally:
        raw.prepare_threshold = threshold
    return columns, rows


def _per_campaign(session: Session, query, campaign_id: int | None) -> dict[int, dict[str, int]]:
    """{campaign id: {key: count}} from a (campaign id, key, count) query on structures."""
    if campaign_id is not None:
        query = query.where(Structure.campaign_id == campaign_id)
    out: dict[int, dict[str, int]] = {}
    for cid, key, n in session.execute(query):
        out.setdefault(cid, {})[key] = n
    return out


def structures_by_source(session: Session,
                         campaign_id: int | None = None) -> dict[int, dict[str, int]]:
    """Structure counts by source, per campaign id (one campaign's with ``campaign_id``)."""
    return _per_campaign(session, select(Structure.campaign_id, Structure.source, func.count())
                         .group_by(Structure.campaign_id, Structure.source), campaign_id)


def labels_by_status(session: Session,
                     campaign_id: int | None = None) -> dict[int, dict[str, int]]:
    """Label counts by status (any labeler), per campaign id of the labelled structure."""
    return _per_campaign(session, select(Structure.campaign_id, Label.status, func.count())
                         .join(Structure, Structure.id == Label.structure_id)
                         .group_by(Structure.campaign_id, Label.status), campaign_id)


def campaign_overview(session: Session) -> list[dict[str, Any]]:
    """One dict per campaign: structures by source, labels by status, rounds."""
    by_source = structures_by_source(session)
    by_status = labels_by_status(session)
    rounds = (
        select(Round.campaign_id, func.count(), func.max(Round.round_index))
        .group_by(Round.campaign_id)
    )
    round_info = {cid: (n, last) for cid, n, last in session.execute(rounds)}
    out = []
    for camp in session.scalars(select(Campaign).order_by(Campaign.created_at, Campaign.id)):
        statuses = by_status.get(camp.id, {})
        n_rounds, last = round_info.get(camp.id, (0, None))
        out.append({
            "campaign": camp.name,
            "created_at": camp.created_at,
            "structures": by_source.get(camp.id, {}),
            "n_structures": sum(by_source.get(camp.id, {}).values()),
            "n_ok": statuses.get(LabelStatus.OK.value, 0),
            "n_failed": sum(v for k, v in statuses.items() if k != LabelStatus.OK.value),
            "n_rounds": n_rounds,
            "last_round": last,
        })
    return out


def round_table(session: Session, campaign: str) -> list[dict[str, Any]]:
    """Rows of the ``round_summary`` view for one campaign, by round index."""
    q = text("SELECT * FROM round_summary WHERE campaign = :c ORDER BY round_index")
    rows = [dict(r._mapping) for r in session.execute(q, {"c": campaign})]
    for row in rows:  # SQLite views give timestamps as ISO text, PostgreSQL as datetimes
        for key in ("started_at", "finished_at"):
            if isinstance(row.get(key), str):
                row[key] = datetime.fromisoformat(row[key])
    return rows


def label_failures(session: Session, campaign: str) -> list[dict[str, Any]]:
    """Failed labels of a campaign grouped by status and error text."""
    q = (
        select(Label.status, Label.error, func.count().label("n"))
        .join(Structure, Structure.id == Label.structure_id)
        .join(Campaign, Campaign.id == Structure.campaign_id)
        .where(Campaign.name == campaign, Label.status != LabelStatus.OK.value)
        .group_by(Label.status, Label.error)
        .order_by(func.count().desc())
    )
    return [r._asdict() for r in session.execute(q)]
