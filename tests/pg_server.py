"""A throwaway PostgreSQL server for tests and benchmarks (Debian's ``postgresql`` binaries).

Not used by the product itself. Starts ``initdb`` + ``pg_ctl`` in a temporary directory,
listening on 127.0.0.1 only (no Unix socket in shared places), trust authentication for
the local test role. As root it runs the server as the ``postgres`` system user, since
PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

__all__ = ["PostgresUnavailable", "TemporaryPostgres", "create_database", "find_pg_bin"]


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_pg_bin() -> Path:
    """Directory holding ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest version
    (``$BAYESAL_TEST_PG_GLOB`` replaces Debian's pattern: a test hides the binaries)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(
        glob.glob(os.environ.get("BAYESAL_TEST_PG_GLOB", "/usr/lib/postgresql/*/bin/initdb")),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not candidates:
        raise PostgresUnavailable(
            "PostgreSQL server binaries not found (initdb). Install them with "
            "`apt-get install postgresql`, or set BAYESAL_TEST_POSTGRES_URL to a running server."
        )
    return Path(candidates[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporaryPostgres:
    """Start a private PostgreSQL cluster; ``url`` points at its ``postgres`` database.

    Parameters
    ----------
    durable
        Keep PostgreSQL's crash-safety settings (fsync on). Tests turn them off for speed;
        benchmarks keep them on so that figures mean what a real server would do.
    """

    user = "bayesal"

    def __init__(self, durable: bool = False) -> None:
        self.bindir = find_pg_bin()
        self.port = _free_port()
        self.durable = durable
        self._tmp: str | None = None

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")

    def start(self) -> TemporaryPostgres:
        self._tmp = tempfile.mkdtemp(prefix="bayesal-pg-")
        data, sock = Path(self._tmp) / "data", Path(self._tmp) / "sock"
        sock.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self._tmp, "postgres")
            shutil.chown(sock, "postgres")
        self._run("initdb", "-D", str(data), "-U", self.user, "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        opts = f"-h 127.0.0.1 -p {self.port} -k {sock}"
        if not self.durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(data), "-o", opts, "-l", str(Path(self._tmp) / "log"),
                  "-w", "-t", "60", "start")
        return self

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self._tmp is None:
            return
        try:
            self._run("pg_ctl", "-D", str(Path(self._tmp) / "data"), "-m", "immediate", "-w",
                      "stop")
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> TemporaryPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def create_database(server_url: str, prefix: str = "bayesal_test") -> str:
    """Create a fresh, uniquely named database on a server; returns its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)
