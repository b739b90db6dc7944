"""Read-side queries: campaign status and the read-only SQL console."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
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
    "stream_readonly_sql",
    "structures_by_source",
    "write_parquet",
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


CHUNK_ROWS = 1000  # rows fetched from the database at a time by stream_readonly_sql


@contextmanager
def stream_readonly_sql(url: str, sql: str, *,
                        chunk: int = CHUNK_ROWS) -> Iterator[tuple[list[str], Iterator[list]]]:
    """Run one query on a read-only connection and stream its rows: yields ``(columns,
    batches)``, where ``batches`` gives lists of at most ``chunk`` rows as the database
    sends them, so memory stays flat whatever the result's size.

    The text check above is a courtesy; the guards are the database's: SQLite connections
    with ``query_only``, which run one statement per call (rows are stepped through the
    cursor, never all fetched); on PostgreSQL a transaction that starts READ ONLY and the
    statement sent through the extended protocol, which refuses a second statement, so
    nothing can end the read-only transaction and start another (``...; COMMIT; BEGIN READ
    WRITE; ...``); its rows arrive in libpq's chunked-rows mode (``Cursor.stream``), a chunk
    at a time."""
    stmt = check_readonly_sql(sql)
    engine = readonly_engine(url)
    try:
        with engine.connect() as conn, _refusals():
            if engine.dialect.name == "postgresql":
                with _postgres_stream(conn, stmt, chunk) as (columns, batches):
                    yield columns, _guarded(batches)
            else:
                result = conn.execute(text(stmt))
                columns = list(result.keys()) if result.returns_rows else []
                yield columns, _guarded(_sqlite_batches(result, chunk) if columns else iter(()))
            conn.rollback()
    finally:
        engine.dispose()


def run_readonly_sql(url: str, sql: str, *, max_rows: int | None = None) -> QueryResult:
    """:func:`stream_readonly_sql` collected: at most ``max_rows`` rows (all with None)."""
    rows: list[tuple[Any, ...]] = []
    with stream_readonly_sql(url, sql) as (columns, batches):
        for batch in batches:
            rows.extend(tuple(r) for r in batch)
            if max_rows is not None and len(rows) >= max_rows:
                del rows[max_rows:]
                break
    return QueryResult(columns, rows)


def _sqlite_batches(result, chunk: int) -> Iterator[list]:
    while batch := result.fetchmany(chunk):
        yield batch


def _guarded(batches: Iterator[list]) -> Iterator[list]:
    """``batches`` with the database's errors met while streaming (a bad cast in row 10^6)
    turned into the same clear errors as at the start."""
    with _refusals():
        yield from batches


@contextmanager
def _refusals() -> Iterator[None]:
    """The database's errors as :class:`ReadOnlyViolation` / :class:`DatabaseError`."""
    try:
        yield
    except DBAPIError as exc:
        msg = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        _raise_refusal(msg)
    except Exception as exc:  # psycopg's own errors on the raw connection
        if type(exc).__module__.split(".")[0] != "psycopg":
            raise
        _raise_refusal(str(exc).strip().splitlines()[0])


def _raise_refusal(msg: str) -> None:
    if any(word in msg for word in ("read-only", "readonly", "query_only",
                                    "multiple commands", "one statement")):
        raise ReadOnlyViolation(f"refused by the database: {msg}. `bayesal sql` is "
                                "read-only and runs one statement.") from None
    raise DatabaseError(f"query failed: {msg}") from None


@contextmanager
def _postgres_stream(conn, stmt: str, chunk: int) -> Iterator[tuple[list[str], Iterator[list]]]:
    """One statement through the extended protocol (one statement only), in the
    connection's READ ONLY transaction (``default_transaction_read_only`` of
    :func:`readonly_engine`), streamed ``chunk`` rows at a time."""
    from psycopg import capabilities

    raw = conn.connection.driver_connection  # psycopg 3
    size = chunk if capabilities.has_stream_chunked() else 1  # libpq >= 17: chunks
    with raw.cursor() as cur:
        cur.execute("SET TRANSACTION READ ONLY", prepare=False)
        rows = cur.stream(stmt, size=size)
        try:
            first = next(rows)
        except StopIteration:
            first = None
        columns = [d.name for d in cur.description or []]

        def batches() -> Iterator[list]:
            if first is None:
                return
            batch = [first]
            for row in rows:
                batch.append(row)
                if len(batch) >= chunk:
                    yield batch
                    batch = []
            if batch:
                yield batch

        try:
            yield columns, batches()
        finally:
            rows.close()


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
    query = select(Label.campaign_id, Label.status, func.count()).group_by(
        Label.campaign_id, Label.status)  # from ix_labels_campaign_summary, no join
    if campaign_id is not None:
        query = query.where(Label.campaign_id == campaign_id)
    out: dict[int, dict[str, int]] = {}
    for cid, status, n in session.execute(query):
        out.setdefault(cid, {})[status] = n
    return out


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


def _parquet_value(value: Any) -> Any:
    """A query cell for Parquet: bayesal arrays as (nested) lists of numbers, JSON as text."""
    from bayesal.db.arrays import ArrayEncodingError, decode_array

    if isinstance(value, bytes | memoryview):
        try:
            return decode_array(value).tolist()
        except ArrayEncodingError:
            return bytes(value)
    if isinstance(value, dict):
        import json

        return json.dumps(value)
    return value


def write_parquet(columns: list[str], batches: Iterator[list], path: Any) -> int:
    """Write streamed query rows to a Parquet file a row group per batch (flat memory);
    returns the row count. Column types come from the first batch (a column empty there is
    text); arrays become lists of numbers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    schema = None
    n = 0
    try:
        for batch in batches:
            cols = {c: [_parquet_value(row[i]) for row in batch] for i, c in enumerate(columns)}
            if schema is None:
                fields = []
                for c, values in cols.items():
                    kind = pa.array(values).type
                    fields.append(pa.field(c, pa.string() if pa.types.is_null(kind) else kind))
                schema = pa.schema(fields)
                writer = pq.ParquetWriter(path, schema)
            for field in schema:
                if pa.types.is_string(field.type):
                    cols[field.name] = [None if v is None else str(v) for v in cols[field.name]]
            try:
                table = pa.Table.from_pydict(cols, schema=schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise DatabaseError(f"cannot write rows {n + 1}-{n + len(batch)} to Parquet: "
                                    f"{exc}. Cast the column to one type in the query "
                                    "(CAST(x AS TEXT)), or use --csv.") from None
            writer.write_table(table)
            n += len(batch)
        if writer is None:  # no rows: an empty file with text columns
            schema = pa.schema([pa.field(c, pa.string()) for c in columns])
            writer = pq.ParquetWriter(path, schema)
    finally:
        if writer is not None:
            writer.close()
    return n
