"""Kill it at any instant. `bayesal run` of a small replay campaign, with its own temporary
Prefect API, is SIGKILLed (the OOM killer, scancel after its grace period: no handler runs)
at seeded random instants drawn over a whole uninterrupted run's duration (start-up, setup,
training, scoring, labeling, between rounds) and resumed after each kill. After every kill
no process of the run may be left (every process the run starts inherits a token in its
environment: the temporary API and its reaper, ensemble members, labeler workers); at the
end the database must hold what the uninterrupted run's holds: the same label count, no
duplicate label, contiguous rounds each counted once, one model set and one selection per
round. Once on SQLite, once on PostgreSQL. The instants and the phase each kill hit are
printed (pytest -s)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import ethanol_campaign
from sqlalchemy import func, select

KILLS, SEED, ROUNDS, N_SELECT, MEMBERS = 6, 20261204, 2, 4, 2
BAYESAL = str(Path(sys.executable).with_name("bayesal"))


def _env(url: str, data_dir: Path, token: str, prefect_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")
           and k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env.update(BAYESAL_DATABASE_URL=url, BAYESAL_DATA_DIR=str(data_dir),
               BAYESAL_CHAOS_TOKEN=token, PREFECT_HOME=str(prefect_home),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def _processes_of(token: str) -> list[psutil.Process]:
    """Live processes whose environment carries the run's token."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("BAYESAL_CHAOS_TOKEN") == token and proc.status() != "zombie":
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _config(folder: Path, shared_data: Path) -> Path:
    return ethanol_campaign(folder, shared_data, name="chaos", n_pool=30, n_test=4,
                            members=MEMBERS, train={"max_epochs": 4, "batch_size": 4},
                            acquisition={"n_select": N_SELECT, "selection": "diverse"},
                            stop={"max_rounds": ROUNDS})


def _summary(url: str) -> dict:
    from bayesal.db import Label, Model, Round, Score, make_engine

    engine = make_engine(url)
    with engine.connect() as conn:
        labels = conn.execute(select(Label.structure_id, Label.settings_hash)).all()
        rounds = conn.execute(select(Round.id, Round.round_index, Round.status)
                              .order_by(Round.round_index)).all()
        models = dict(conn.execute(select(Model.round_id, func.count())
                                   .group_by(Model.round_id)).all())
        selected = dict(conn.execute(select(Score.round_id, func.count())
                                     .where(Score.selected).group_by(Score.round_id)).all())
        scores = conn.execute(select(Score.round_id, Score.structure_id, Score.acquisition)).all()
    engine.dispose()
    return {"labels": len(labels), "distinct labels": len(set(labels)),
            "rounds": [(r.round_index, r.status) for r in rounds],
            "models per round": [models.get(r.id, 0) for r in rounds],
            "selected per round": [selected.get(r.id, 0) for r in rounds],
            "duplicate scores": len(scores) - len(set(scores))}


def _phase(url: str) -> str:
    """Where the campaign stood when the kill came, from the database."""
    from bayesal.db.engine import readonly_session
    from bayesal.db.queries import campaign_overview, round_table

    try:
        with readonly_session(url) as session:
            if not campaign_overview(session):
                return "start-up"
            rounds = round_table(session, "chaos")
    except Exception:
        return "start-up (no schema yet)"
    running = [r for r in rounds if r["status"] == "running"]
    if not rounds:
        return "setup"
    if not running:
        return f"between rounds (after round {rounds[-1]['round_index']})"
    r = running[0]
    step = ("training" if not r["n_models"] else "evaluating/scoring" if not r["n_selected"]
            else f"labeling ({r['n_ok'] + r['n_failed']}/{r['n_selected']})")
    return f"round {r['round_index']}: {step}"


def _wait_gone(token: str, timeout: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _processes_of(token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    out = []
    for proc in left:
        try:
            out.append(" ".join(proc.cmdline())[:200])
            proc.kill()
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_data):
    """The campaign run once without a kill: its database summary and wall time."""
    folder = tmp_path_factory.mktemp("chaos-reference")
    config = _config(folder, shared_data)
    url = f"sqlite:///{folder / 'ref.db'}"
    token = uuid.uuid4().hex
    t0 = time.monotonic()
    out = subprocess.run([BAYESAL, "run", str(config)], capture_output=True, text=True,
                         env=_env(url, folder / "data", token, folder / "prefect"),
                         timeout=900)
    seconds = time.monotonic() - t0
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert _wait_gone(token) == []
    summary = _summary(url)
    assert summary["rounds"] == [(k, "completed") for k in range(ROUNDS)]
    return summary, seconds


def _wait_for_flow(proc: subprocess.Popen, log: Path, timeout: float = 300) -> bool:
    """Block until the run's campaign flow has begun (start-up over); False if the run
    ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "Beginning flow run 'chaos'" in log.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise AssertionError(f"no flow run after {timeout} s: {log.read_text()[-2000:]}")


@pytest.mark.slow
def test_sigkill_at_random_instants_loses_duplicates_and_leaves_nothing(
        request, uninterrupted, db_url, shared_data, tmp_path):
    """The kill instants are drawn on the uninterrupted run's timeline and replayed on the
    work: the first kill comes t1 after the first start (it may hit start-up); each later
    one t(k) - t(k-1) after the resumed run's flow has begun, so every kill lands in work
    still to do. SQLite runs with its own temporary Prefect API (reaper and parent-death
    signal under test); PostgreSQL with the session's API (fewer start-ups in CI)."""
    reference, seconds = uninterrupted
    config = _config(tmp_path, shared_data)
    token = uuid.uuid4().hex
    env = _env(db_url, tmp_path / "data", token, tmp_path / "prefect")
    if db_url.startswith("postgresql"):
        env["PREFECT_API_URL"] = request.getfixturevalue("prefect_api")
    instants = np.sort(np.random.default_rng(SEED).uniform(0.0, seconds, KILLS))
    print(f"\nuninterrupted run: {seconds:.1f} s; kills at "
          f"{', '.join(f'{t:.1f}' for t in instants)} s of its timeline")
    previous = 0.0
    for k, instant in enumerate(instants):
        log_path = tmp_path / f"run-{k}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([BAYESAL, "run", str(config), "--resume"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            began = k == 0 or _wait_for_flow(proc, log_path)
            delay = instant - previous
            previous = instant
            try:
                proc.wait(timeout=delay if began else 0)
                print(f"  kill {k}: the run ended before it")
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)  # the main process only, like an OOM kill
                proc.wait()
                where = "after start" if k == 0 else "into the resumed flow"
                print(f"  kill {k}, {delay:.1f} s {where}: {_phase(db_url)}")
        left = _wait_gone(token)
        assert left == [], f"kill {k} left processes behind: {left}"
        assert proc.returncode in (0, -signal.SIGKILL), log_path.read_text()[-3000:]

    out = subprocess.run([BAYESAL, "run", str(config), "--resume"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert _wait_gone(token) == []
    assert _summary(db_url) == reference
    assert reference["labels"] == reference["distinct labels"]
    assert reference["models per round"] == [MEMBERS] * ROUNDS
    assert reference["selected per round"] == [N_SELECT] * ROUNDS
    assert reference["duplicate scores"] == 0


@pytest.mark.slow
def test_a_kill_while_the_temporary_api_starts_leaves_no_server(shared_data, tmp_path):
    """SIGKILL the moment Prefect's temporary API process exists, before it answers (it
    needs seconds to start): the server must not outlive the run."""
    config = _config(tmp_path, shared_data)
    token = uuid.uuid4().hex
    env = _env(f"sqlite:///{tmp_path / 'k.db'}", tmp_path / "data", token,
               tmp_path / "prefect")
    proc = subprocess.Popen([BAYESAL, "run", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    deadline = time.monotonic() + 300
    try:
        while server is None and time.monotonic() < deadline and proc.poll() is None:
            server = next((p for p in _processes_of(token) if "create_app" in " ".join(
                p.cmdline())), None)
        assert server is not None, "the temporary API never started"
        conns = [c for c in server.net_connections() if c.status == psutil.CONN_LISTEN]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert conns == []  # killed before the server listened
    assert _wait_gone(token) == []
