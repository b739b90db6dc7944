"""Engines, sessions and schema management (Alembic) for SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "DatabaseError",
    "SchemaOutOfDate",
    "alembic_config",
    "check_url",
    "current_revision",
    "ensure_schema",
    "head_revision",
    "make_engine",
    "readonly_engine",
    "readonly_session",
    "redact_url",
    "session_scope",
    "upgrade",
    "without_secrets",
]

_MIGRATIONS = Path(__file__).parent / "migrations"
SUPPORTED_DIALECTS = ("sqlite", "postgresql")


class DatabaseError(RuntimeError):
    """A database cannot be used as asked; the message says what to do."""


class SchemaOutOfDate(DatabaseError):
    """The database schema is missing or older than this version of bayesal."""


#: query parameters of a URL that hold secrets (libpq's names)
_SECRET_PARAMS = frozenset({"password", "sslpassword"})
_HIDDEN = "***"


def redact_url(url: str | URL) -> str:
    """``url`` fit to print: the password (``user:pw@`` and ``?password=``) hidden.

    Works on strings that are not valid URLs too (for error messages about them)."""
    import re

    try:
        parsed = make_url(url)
    except Exception:  # not a URL SQLAlchemy parses: hide what looks like a secret
        text = re.sub(r":[^:@/]*@", f":{_HIDDEN}@", str(url))
        return re.sub(r"((?:^|[?&])(?:ssl)?password=)[^&#]*", rf"\1{_HIDDEN}", text,
                      flags=re.I)
    if parsed.password is not None:
        parsed = parsed.set(password=_HIDDEN)
    if any(k.lower() in _SECRET_PARAMS for k in parsed.query):
        parsed = parsed.set(query={k: (_HIDDEN if k.lower() in _SECRET_PARAMS else v)
                                   for k, v in parsed.query.items()})
    return parsed.render_as_string(hide_password=False).replace("%2A%2A%2A", _HIDDEN)


def without_secrets(url: str) -> tuple[str, bool]:
    """``url`` without its password (user:pw@ or ?password=), and whether it had one: for
    URLs stored where others can read them (Prefect deployments). libpq then reads the
    password from ~/.pgpass (PGPASSFILE) or PGPASSWORD of the process that connects."""
    parsed = make_url(url)
    secret = [k for k in parsed.query if k.lower() in _SECRET_PARAMS]
    if parsed.password is None and not secret:
        return url, False
    parsed = URL.create(parsed.drivername, username=parsed.username, host=parsed.host,
                        port=parsed.port, database=parsed.database,
                        query={k: v for k, v in parsed.query.items() if k not in secret})
    return parsed.render_as_string(hide_password=False), True


def check_url(url: str) -> URL:
    """Parse and validate a database URL; raises :class:`DatabaseError` saying what is wrong."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(
            f"invalid database URL {redact_url(url)!r}. Examples: sqlite:///bayesal.db, "
            "postgresql+psycopg://user:password@host:5432/dbname"
        ) from None
    if parsed.get_backend_name() not in SUPPORTED_DIALECTS:
        raise DatabaseError(
            f"database backend {parsed.get_backend_name()!r} is not supported; "
            f"use one of {', '.join(SUPPORTED_DIALECTS)}"
        )
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3, a declared dependency
    try:
        parsed.get_dialect()
    except Exception:
        raise DatabaseError(
            f"database driver {parsed.drivername!r} is not available; use sqlite:///... or "
            "postgresql+psycopg://..."
        ) from None
    return parsed


def _sqlite_pragmas(readonly: bool):
    def on_connect(dbapi_conn, _record):
        # Let the pysqlite driver never BEGIN implicitly; SQLAlchemy emits BEGIN itself below,
        # which makes SQLite transactions (and savepoints) behave as on PostgreSQL.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")  # wait for writers instead of failing
        if readonly:
            cur.execute("PRAGMA query_only=ON")
        else:
            cur.execute("PRAGMA journal_mode=WAL")  # readers (dashboard) never block the writer
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    return on_connect


def make_engine(url: str, *, readonly: bool = False, echo: bool = False) -> Engine:
    """Create an engine for a bayesal database.

    Parameters
    ----------
    url
        Any SQLAlchemy URL of a supported backend: ``sqlite:///path.db`` or
        ``postgresql+psycopg://user:pw@host/db`` (plain ``postgresql://`` uses psycopg 3).
    readonly
        Enforced by the database itself: SQLite ``PRAGMA query_only``, PostgreSQL
        ``default_transaction_read_only``. Any write raises.
    """
    parsed = check_url(url)
    kwargs: dict = {"echo": echo}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            file = Path(parsed.database).expanduser()
            if readonly and not file.exists():
                raise DatabaseError(
                    f"database file {file} does not exist; create it with `bayesal db upgrade` "
                    "or `bayesal import ...`, or point BAYESAL_DATABASE_URL at another one"
                )
            file.parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
        engine = create_engine(parsed, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas(readonly))

        # Writers take the lock at BEGIN (IMMEDIATE) so concurrent writers queue up under
        # busy_timeout instead of failing when a read lock cannot be upgraded.
        begin = "BEGIN" if readonly else "BEGIN IMMEDIATE"

        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql(begin)

        return engine
    kwargs["pool_pre_ping"] = True
    # No automatic server-side prepared statements (psycopg prepares a query after 5
    # executions): PostgreSQL then switches to a generic plan, made from statistics that
    # know nothing of the rows a long import has written in its open transaction, and the
    # per-batch id lookup became a scan of the campaign's structures (100k imported:
    # 6.7 s a batch, quadratic). Planned afresh each time, it stays an index scan.
    kwargs["connect_args"] = {"prepare_threshold": None}
    if readonly:
        kwargs["connect_args"]["options"] = "-c default_transaction_read_only=on"
    return create_engine(parsed, **kwargs)


def readonly_engine(url: str) -> Engine:
    """Engine whose connections refuse every write (see :func:`make_engine`)."""
    return make_engine(url, readonly=True)


@contextlib.contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: commit on success, roll back everything on any exception."""
    factory = sessionmaker(engine, expire_on_commit=False)
    with factory() as session, session.begin():
        yield session


@contextlib.contextmanager
def readonly_session(url: str, *, check_schema: bool = True) -> Iterator[Session]:
    """A session on a fresh read-only engine, disposed afterwards.

    With ``check_schema`` a database without the current schema raises
    :class:`SchemaOutOfDate` naming the command to run.
    """
    engine = readonly_engine(url)
    try:
        if check_schema:
            ensure_schema(engine)
        with session_scope(engine) as session:
            yield session
    finally:
        engine.dispose()


def alembic_config(engine: Engine):
    """Alembic configuration that runs bayesal's migrations on ``engine``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    """Newest migration revision shipped with this version of bayesal."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(_MIGRATIONS))
    return script.get_current_head() or ""


def current_revision(engine: Engine) -> str | None:
    """Revision the database is at, or ``None`` for a database without bayesal schema."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Apply migrations up to ``revision``; returns the revision reached."""
    from alembic import command

    command.upgrade(alembic_config(engine), revision)
    return current_revision(engine) or ""


def ensure_schema(engine: Engine, *, create: bool = False) -> None:
    """Check that the schema is at the head revision.

    With ``create=True`` a missing or older schema is upgraded in place; otherwise
    :class:`SchemaOutOfDate` says exactly which command to run.
    """
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    if create:
        upgrade(engine)
        return
    where = redact_url(engine.url)
    state = "has no bayesal schema" if current is None else f"is at revision {current}"
    raise SchemaOutOfDate(
        f"database {where} {state}; this bayesal needs revision {head}. "
        "Run `bayesal db upgrade` (with the same BAYESAL_DATABASE_URL) first."
    )
