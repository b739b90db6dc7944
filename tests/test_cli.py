"""The `bayesal` command line, run as users run it (typer's runner, real databases)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from typer.testing import CliRunner

from bayesal.cli import app
from bayesal.db import make_engine, readonly_engine

runner = CliRunner()


def bayesal(url: str, *args: str):
    return runner.invoke(app, ["--database-url", url, *args], catch_exceptions=False)


@pytest.fixture(scope="module",
                params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def filled(request, tmp_path_factory, shared_data):
    """A database holding the 1000 labelled ethanol frames (read-only tests share it)."""
    if request.param == "sqlite":
        db_url = f"sqlite:///{tmp_path_factory.mktemp('cli') / 'bayesal.db'}"
    else:
        from pg_server import create_database

        db_url = create_database(request.getfixturevalue("pg_server"))
    res = bayesal(db_url, "import", str(shared_data / "ethanol" / "train.xyz"), "--campaign",
                  "eth", "--labelled", "--method", "pbe", "--basis", "def2-svp")
    assert res.exit_code == 0, res.output
    assert "1000 new structures" in res.output
    return db_url


def test_status_and_everyday_sql(filled):
    res = bayesal(filled, "status")
    assert res.exit_code == 0 and "eth" in res.output and "1000" in res.output
    res = bayesal(filled, "status", "--campaign", "nope")
    assert res.exit_code == 1 and "no campaign named 'nope'" in res.output and "eth" in res.output
    res = bayesal(filled, "sql", "--csv",
                  "SELECT formula, COUNT(*) AS n FROM labelled_data GROUP BY formula")
    assert res.exit_code == 0
    assert res.output.splitlines()[:2] == ["formula,n", "C2H6O,1000"]
    res = bayesal(filled, "sql", "SELECT positions FROM structures LIMIT 1")
    assert "<array (9, 3)>" in res.output
    res = bayesal(filled, "sql", "--csv", "SELECT forces FROM labels ORDER BY id LIMIT 1")
    assert len(json.loads(res.output.splitlines()[1].strip('"').replace('""', '"'))) == 9


@pytest.mark.parametrize("stmt", [
    "DELETE FROM labels",
    "UPDATE labels SET energy = 0",
    "DROP TABLE labels",
    "  delete from labels;",
    "SELECT 1; DELETE FROM labels",
    "PRAGMA query_only = OFF",
    "/* sneaky */ INSERT INTO campaigns (name) VALUES ('x')",
])
def test_sql_refuses_writes(filled, stmt):
    res = bayesal(filled, "sql", stmt)
    assert res.exit_code == 1
    assert "read-only" in res.output or "one statement" in res.output
    res = bayesal(filled, "sql", "--csv", "SELECT COUNT(*) AS n FROM labels")
    assert res.output.splitlines()[1] == "1000"


@pytest.mark.parametrize("stmt", [
    # PostgreSQL's E'' literal hides the ';' from the text check; a second statement must
    # still be impossible (the simple query protocol would run them all)
    "SELECT E'\\'';COMMIT;BEGIN READ WRITE;CREATE TABLE pwned(x int);DELETE FROM labels;"
    "COMMIT;SELECT 'x'",
    "SELECT E'\\'';SET default_transaction_read_only = off;CREATE TABLE pwned(x int);"
    "SELECT 'x'",
    "SELECT E'\\'';ROLLBACK;START TRANSACTION READ WRITE;DROP TABLE labels CASCADE;"
    "COMMIT;SELECT 'x'",
    "WITH d AS (DELETE FROM labels RETURNING 1) SELECT count(*) FROM d",
    "SELECT set_config('default_transaction_read_only', 'off', false), E'\\'';"
    "CREATE TABLE pwned(x int);SELECT '",
])
def test_sql_cannot_be_tricked_into_writing(filled, stmt):
    res = bayesal(filled, "sql", stmt)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    engine = make_engine(filled)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM labels")).scalar() == 1000
            tables = conn.execute(text(
                "SELECT name FROM sqlite_master WHERE type = 'table'" if filled.startswith(
                    "sqlite") else "SELECT tablename FROM pg_tables")).scalars().all()
            assert "pwned" not in tables
    finally:
        engine.dispose()
    res = bayesal(filled, "sql", "--csv", "SELECT COUNT(*) AS n, '100%' AS p FROM labels")
    assert res.output.splitlines()[1] == "1000,100%"


def test_database_itself_refuses_writes_on_readonly_connections(filled):
    """The keyword check is convenience; the database is the guard (CTEs, EXPLAIN ANALYZE)."""
    engine = readonly_engine(filled)
    try:
        with engine.connect() as conn, pytest.raises(DBAPIError):
            conn.execute(text("DELETE FROM labels"))
    finally:
        engine.dispose()
    res = bayesal(filled, "sql", "WITH x AS (SELECT 1) DELETE FROM labels")
    assert res.exit_code == 1 and "read-only" in res.output
    engine = make_engine(filled)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM labels")).scalar() == 1000
    engine.dispose()


def test_export_command_writes_file(filled, tmp_path):
    out = tmp_path / "sub" / "eth.xyz"
    res = bayesal(filled, "export", "--campaign", "eth", "--output", str(out))
    assert res.exit_code == 0, res.output
    assert out.read_text().count("REF_energy=") == 1000
    res = bayesal(filled, "export", "--campaign", "eth", "--output", str(out), "--format", "xls")
    assert res.exit_code == 1 and "unknown export format" in res.output


def test_import_errors_are_readable(sqlite_url, tmp_path):
    bad = tmp_path / "bad.xyz"
    bad.write_text("2\nProperties=species:S:1:pos:R:3\nH 0 0 0\nH 0 0 0.7\n")
    res = bayesal(sqlite_url, "import", str(bad), "--campaign", "c", "--labelled")
    assert res.exit_code == 1
    assert "bad.xyz, frame 0, field 'energy'" in res.output
    assert "nothing was written" in res.output
    res = bayesal(sqlite_url, "import", str(bad), "--campaign", "c", "--source", "zoo")
    assert res.exit_code == 1 and "initial, pool, explored, test" in res.output


def test_read_commands_on_a_missing_database_say_what_to_run(tmp_path):
    url = f"sqlite:///{tmp_path / 'none.db'}"
    res = bayesal(url, "status")
    assert res.exit_code == 1 and "does not exist" in res.output
    res = bayesal(url, "db", "upgrade")
    assert res.exit_code == 0 and "revision 0003" in res.output
    res = bayesal(url, "status")
    assert res.exit_code == 0 and "no campaigns yet" in res.output


def test_unreachable_postgres_is_a_clear_error():
    res = bayesal("postgresql+psycopg://nobody@127.0.0.1:1/none", "db", "upgrade")
    assert res.exit_code == 1 and "cannot use the database" in res.output


def test_status_fits_80_columns_without_cutting_anything(filled, tmp_path):
    """CliRunner output is not a terminal: Rich renders it 80 columns wide."""
    res = bayesal(filled, "status", "--campaign", "eth")
    assert res.exit_code == 0, res.output
    assert "…" not in res.output
    assert max(len(line) for line in res.output.splitlines()) <= 80


def test_the_learning_curve_table_fits_80_columns():
    from rich.console import Console

    from bayesal.cli.campaign import round_metrics_table

    rows = [{"round": i, "train labels": 1000 + 8 * i, "new ok": 8, "failed": 12,
             "test F MAE eV/Å": 0.1623, "test E MAE eV": 0.01234, "test F NLL": -1.2345,
             "val F MAE eV/Å": 0.14444, "selected mean score": 12.345, "round s": 12345.6}
            for i in range(12)]
    console = Console(width=80, record=True)
    console.print(round_metrics_table("a-campaign-with-a-long-name", rows))
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    assert " 162 " in text and "12.3" in text and "-1.23" in text  # meV, 3 digits


def test_the_learning_curve_verdict_says_whether_the_model_improved():
    from bayesal.cli.campaign import learning_verdict

    rows = [{"round": i, "train labels": 8 * (i + 1), "test F MAE eV/Å": mae,
             "val F MAE eV/Å": 0.3}
            for i, mae in enumerate([0.413, 0.268, 0.284, 0.158])]
    assert learning_verdict(rows) == (
        "test force MAE fell 413 -> 158 meV/Å from round 0 to round 3 (0.38 x) as its "
        "training labels grew 8 -> 32; lower than the round before in 2 of 3 rounds.")
    rising = [{"round": 0, "val F MAE eV/Å": 0.1}, {"round": 1, "val F MAE eV/Å": 0.125}]
    assert learning_verdict(rising).startswith("validation force MAE rose 100 -> 125 meV/Å")
    assert learning_verdict(rows[:1]) is None  # one round: no curve yet


def test_long_commands_log_progress_with_totals_when_stderr_is_a_file(shared_data, tmp_path):
    """Batch jobs see progress: `bayesal import` and `export` with stderr redirected to a
    file write lines with the count, the total (frames counted before parsing; rows to
    export), the rate, the time left, and a last line when done (interval
    BAYESAL_PROGRESS_SECONDS, here 0: every update)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import ase.io

    frames = tmp_path / "frames.xyz"
    ase.io.write(frames, ase.io.read(shared_data / "ethanol" / "train.xyz", ":120"))
    url = f"sqlite:///{tmp_path / 'b.db'}"
    exe = str(Path(sys.executable).with_name("bayesal"))
    env = {**os.environ, "BAYESAL_PROGRESS_SECONDS": "0"}
    for args, unit in ((["import", str(frames), "--campaign", "c", "--labelled"], "frames"),
                       (["export", "--campaign", "c", "--output", str(tmp_path / "o.xyz")],
                        "structures")):
        with open(tmp_path / "stderr.txt", "w") as err:
            out = subprocess.run([exe, "--database-url", url, *args], env=env, stderr=err,
                                 stdout=subprocess.PIPE, text=True, timeout=300)
        log = (tmp_path / "stderr.txt").read_text().splitlines()
        assert out.returncode == 0, log
        assert f"60 of 120 {unit} (50 %)" in "\n".join(log), log[:5]
        assert any("/s, about" in line and "left" in line for line in log), log[:5]
        assert log[-1].endswith(f"120 of 120 {unit} (100 %), " + log[-1].split(", ")[-2]
                                + ", done"), log[-1]


def test_sql_parquet_that_fails_midway_leaves_no_file(sqlite_url, tmp_path):
    """Rows 1-1,000 are integers, later ones text: the second batch cannot join the file's
    schema; the error says how to fix the query and no half-written file is left."""
    out = tmp_path / "v.parquet"
    query = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1500) "
             "SELECT CASE WHEN i > 1200 THEN 'x' ELSE i END AS v FROM n")
    res = bayesal(sqlite_url, "db", "upgrade")
    res = bayesal(sqlite_url, "sql", "--parquet", str(out), query)
    assert res.exit_code == 1 and "CAST(x AS TEXT)" in res.output, res.output
    assert not out.exists() and not list(tmp_path.glob(".v.parquet.*"))
    res = bayesal(sqlite_url, "sql", "--parquet", str(out), query.replace("> 1200", "> 2000"))
    assert res.exit_code == 0 and "1500 rows written" in res.output, res.output
    assert out.is_file()


def test_store_commands_do_not_load_the_model_libraries(sqlite_url):
    """`sql`, `status` and `db` never touch torch, e3nn or PySCF: the error handler every
    command runs under must not import them either (they cost ~280 MB and seconds)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from bayesal.cli import main\n"
        "url = sys.argv[1]\n"
        "for argv in (['db', 'upgrade'], ['status'],\n"
        "             ['sql', 'SELECT COUNT(*) AS n FROM labels']):\n"
        "    sys.argv = ['bayesal', '--database-url', url, *argv]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, (argv, exc.code)\n"
        "print('LOADED', sorted(m for m in ('torch', 'e3nn', 'pyscf') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, sqlite_url], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout
