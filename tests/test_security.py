"""Safe on a shared cluster: a database password never reaches an output or a deployment,
a command uses the database it was given, and no step starts more labeler processes than
configured (see docs/security.md)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import ase.io
import pytest
import yaml
from helpers import TINY, ethanol_campaign, rattled_waters
from sqlalchemy import select
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from bayesal.cli import app
from bayesal.db import engine as db_engine
from bayesal.db.engine import DatabaseError, check_url

PW = "s3cretPW"
runner = CliRunner()


def _with_password(url: str) -> str:
    """Both forms at once: user:password@ and ?password= (libpq reads the latter too)."""
    parsed = make_url(url)
    return parsed.set(password=PW, query={**parsed.query, "password": PW}).render_as_string(
        hide_password=False)


@pytest.mark.parametrize("url", [
    f"postgresql+psycopg://user:{PW}@127.0.0.1:55432/bayesal",
    f"postgresql+psycopg://user@127.0.0.1/bayesal?password={PW}&sslmode=require",
    f"postgresql://user@host/db?sslpassword={PW}",
    f"mysql://user:{PW}@host/db",
    f"not a url at all user:{PW}@host?password={PW}",
])
def test_every_form_of_a_database_url_prints_without_its_password(url):
    assert PW not in db_engine.redact_url(url) and "***" in db_engine.redact_url(url)
    with pytest.raises(DatabaseError) as err:
        check_url(url.replace("postgresql", "oracle"))
    assert PW not in str(err.value)
    from bayesal.flows.settings import SettingsError, load_settings

    with pytest.raises(SettingsError) as err:
        load_settings(database_url=url.replace("postgresql", "mysql"))
    assert PW not in str(err.value) and "BAYESAL_DATABASE_URL" in str(err.value)


def test_urls_for_deployments_lose_the_password_and_keep_the_rest():
    url, had = db_engine.without_secrets(f"postgresql+psycopg://u:{PW}@h:5/db?password={PW}&sslmode=x")
    assert had and PW not in url
    parsed = make_url(url)
    assert (parsed.username, parsed.host, parsed.port, parsed.database, dict(parsed.query)) \
        == ("u", "h", 5, "db", {"sslmode": "x"})
    assert db_engine.without_secrets("sqlite:////tmp/x.db") == ("sqlite:////tmp/x.db", False)


@pytest.mark.postgres
def test_no_command_prints_the_password(pg_url, tmp_path):
    """The test server trusts local connections, so a URL with a password works and every
    output can be searched for it."""
    url = _with_password(pg_url)
    ase.io.write(tmp_path / "w.xyz", rattled_waters(3))
    outputs = []
    for args in (["db", "current"], ["status"], ["db", "upgrade"], ["db", "current"],
                 ["import", str(tmp_path / "w.xyz"), "--campaign", "c"], ["status"],
                 ["sql", "SELECT name FROM campaigns"],
                 ["sql", "DELETE FROM campaigns"]):
        res = runner.invoke(app, ["--database-url", url, *args])
        outputs.append(res.output)
    text = "\n".join(outputs)
    assert "has no bayesal schema" in outputs[1]  # errors name the database, masked
    assert "127.0.0.1" in text and PW not in text
    missing = _with_password(pg_url.rsplit("/", 1)[0] + "/no_such_database")
    res = runner.invoke(app, ["--database-url", missing, "status"])
    assert res.exit_code == 1 and PW not in res.output and "Traceback" not in res.output


def test_deploy_stores_no_password(prefect_api, shared_data, tmp_path, monkeypatch):
    import httpx

    config = ethanol_campaign(tmp_path, shared_data, name="secret")
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    url = f"postgresql+psycopg://bayesal:{PW}@127.0.0.1:1/bayesal?password={PW}"
    res = runner.invoke(app, ["--database-url", url, "deploy", str(config), "--pool",
                              "security-pool", "--name", "secret"])
    assert res.exit_code == 0, res.output
    assert PW not in res.output and "PGPASSWORD" in res.output
    found = httpx.post(f"{prefect_api}/deployments/filter", json={}).text
    assert "secret" in found and "127.0.0.1:1/bayesal" in found  # the database, no password
    assert PW not in found


def test_prefect_yaml_templates_no_database_url_into_deployments():
    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())
    for dep in spec["deployments"]:
        env = dep["work_pool"]["job_variables"].get("env", {})
        assert "BAYESAL_DATABASE_URL" not in env and not any("PASSWORD" in k for k in env)


def _labeler_workers(parent: int) -> int:
    """Live labeler worker processes started by process ``parent``."""
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and \
                b"bayesal.labelers._worker" in cmd:
            n += 1
    return n


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres",
                                                             marks=pytest.mark.postgres)])
def test_run_writes_to_the_database_it_is_given_with_the_configured_workers(
        backend, prefect_api, tmp_path, request):
    """`bayesal --database-url X run`: every row lands in X (with BAYESAL_DATABASE_URL
    unset, nothing in ./bayesal.db), labeling, setup included, never runs more PySCF
    workers than ``labeler.workers``, and neither the run's output nor what Prefect's API
    holds about its flow runs, task runs and logs contains the database password."""
    import subprocess
    import sys

    import httpx

    from bayesal.db import Label, Round, Structure, make_engine

    ase.io.write(tmp_path / "start.xyz", rattled_waters(8, seed=1))
    ase.io.write(tmp_path / "test.xyz", rattled_waters(4, seed=2))
    ase.io.write(tmp_path / "pool.xyz", rattled_waters(6, seed=3))
    cfg = {"name": "one-db", "data": {"initial_files": ["start.xyz"], "pool_files": ["pool.xyz"],
                                      "test_files": ["test.xyz"], "valid_fraction": 0.25},
           "members": 1, "model": TINY, "train": {"max_epochs": 2, "batch_size": 4},
           "acquisition": {"n_select": 2, "selection": "top-k"},
           "labeler": {"kind": "pyscf", "method": "hf", "basis": "sto-3g", "workers": 1,
                       "timeout_s": 120},
           "stop": {"max_rounds": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAYESAL_")}
    env.update(PREFECT_API_URL=prefect_api, BAYESAL_DATA_DIR=str(tmp_path / "data"))
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'named.db'}"
    else:
        url = _with_password(request.getfixturevalue("pg_url"))
    bayesal = Path(sys.executable).with_name("bayesal")
    proc = subprocess.Popen([str(bayesal), "--database-url", url, "run",
                             str(tmp_path / "c.yaml")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _labeler_workers(proc.pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        done.set()
        watcher.join()
    assert proc.returncode == 0, output[-3000:]
    assert not (tmp_path / "bayesal.db").exists()
    assert PW not in output
    for what in ("flow_runs", "task_runs", "logs"):
        found = httpx.post(f"{prefect_api}/{what}/filter", json={"limit": 200}).text
        assert PW not in found, what
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.scalar(select(Round.status)) == "completed"
        assert len(conn.scalars(select(Structure.id)).all()) == 18
        assert len(conn.scalars(select(Label.id).where(Label.status == "ok")).all()) == 14
    engine.dispose()
    assert peak[0] == 1


def test_text_from_data_prints_literally_without_escape_sequences(sqlite_url, tmp_path):
    """Campaign names (and any text read from a database) are data: Rich markup in them
    used to crash `status` and `sql` (``a[/b]``) or render (``[bold red]FAKE[/]``), and
    terminal escape sequences reached the terminal."""
    ase.io.write(tmp_path / "w.xyz", rattled_waters(2))
    names = ["a[/b]", "[bold red]FAKE[/]", "clear\x1b[2Jscreen"]
    for name in names:
        res = runner.invoke(app, ["--database-url", sqlite_url, "import",
                                  str(tmp_path / "w.xyz"), "--campaign", name])
        assert res.exit_code == 0 and res.exception is None, res.output
    for args in (["status"], ["sql", "SELECT name FROM campaigns"],
                 ["status", "--campaign", "a[/b]"]):
        res = runner.invoke(app, ["--database-url", sqlite_url, *args])
        assert res.exit_code == 0 and res.exception is None, res.output
        assert "\x1b" not in res.output
        assert "[/b]" in res.output or args[-1] == "a[/b]"
    res = runner.invoke(app, ["--database-url", sqlite_url, "sql", "SELECT name FROM campaigns"])
    assert "[bold red]FAKE[/]" in res.output and "clear[2Jscreen" in res.output


def test_csv_cells_never_start_a_spreadsheet_formula(sqlite_url, tmp_path):
    import csv

    import numpy as np
    from ase.calculators.singlepoint import SinglePointCalculator

    waters = rattled_waters(2)
    for a in waters:
        a.calc = SinglePointCalculator(a, energy=-2040.0, forces=np.zeros((3, 3)))
    ase.io.write(tmp_path / "w.xyz", waters)
    evil = '=HYPERLINK("http://evil","x")'
    res = runner.invoke(app, ["--database-url", sqlite_url, "import", str(tmp_path / "w.xyz"),
                              "--campaign", evil, "--labelled", "--method", "hf", "--basis",
                              "sto-3g"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "c.csv"
    res = runner.invoke(app, ["--database-url", sqlite_url, "export", "--campaign", evil,
                              "--output", str(out), "--format", "csv"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert rows and all(r["campaign"] == "'" + evil for r in rows)
    res = runner.invoke(app, ["--database-url", sqlite_url, "sql", "--csv",
                              "SELECT '@SUM(1)' AS a, '-2+3' AS b, -2 AS c, 'ok' AS d"])
    assert res.output.splitlines()[1] == "'@SUM(1),'-2+3,-2,ok"


def test_dashboard_markdown_shows_database_text_as_written():
    from bayesal.dashboard.data import md

    text = md("[click](http://evil.example) ![x](http://evil.example/p.png) <img src=x> *b*"
              " \x1b[2J")
    import re

    assert "\x1b" not in text
    unescaped = re.findall(r"(?<!\\)[\[\]()!<>*:]", text)
    assert unescaped == []
    assert text.replace("\\", "") == ("[click](http://evil.example) ![x](http://evil.example/"
                                      "p.png) <img src=x> *b* [2J")
