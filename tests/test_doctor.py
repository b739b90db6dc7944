"""`bayesal doctor` and the campaign run lock: what an interrupted run leaves is reported
with what --resume does about it; a clean database reports nothing; a campaign that is
running is neither reported as stuck nor started a second time."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import rattled_waters
from typer.testing import CliRunner

from bayesal.cli import app

runner = CliRunner()


def _doctor(url: str, data_dir, *args: str):
    os.environ["BAYESAL_DATA_DIR"] = str(data_dir)
    return runner.invoke(app, ["--database-url", url, "doctor", *args],
                         catch_exceptions=False)


@pytest.fixture
def interrupted(db_url, tmp_path):
    """A campaign as a kill during round 1's labeling leaves it: round 0 completed, round 1
    running with 3 selected structures of which 1 is labelled, its model directory there."""
    from bayesal.db import make_engine
    from bayesal.db.importer import import_atoms
    from bayesal.db.ingest import LabelRecord, run_transaction, upsert_labels
    from bayesal.db.rounds import ScoreRow, finish_round, mark_selected, open_round

    engine = make_engine(db_url)
    ids = import_atoms(engine, rattled_waters(8, seed=1), "crashed").structure_ids
    r0 = open_round(engine, "crashed")
    finish_round(engine, r0.id, metrics={"n_ok": 0}, n_labelled=0)
    r1 = open_round(engine, "crashed")
    mark_selected(engine, r1.id, "bald-ef", [ScoreRow(i, 1.0, {}) for i in ids[:3]])
    record = LabelRecord(status="ok", energy=-2040.0, forces=np.zeros((3, 3)),
                         labeler="pyscf", method="hf", basis="sto-3g",
                         settings_hash="ab" * 32, settings={})
    run_transaction(engine, lambda s: upsert_labels(s, [(ids[0], record)], round_id=r1.id))
    engine.dispose()
    data = tmp_path / "data"
    (data / "campaigns" / "crashed" / "round-001" / "model" / "work").mkdir(parents=True)
    (data / "campaigns" / "crashed" / "round-007").mkdir()
    return db_url, data


def test_doctor_reports_a_killed_runs_leftovers_and_a_clean_campaign_as_clean(interrupted):
    url, data = interrupted
    res = _doctor(url, data)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "crashed: round 1 is marked running" in text
    assert "--resume` continues it from its last complete step" in text
    assert "2 of 3 selected structures have no label yet" in text
    assert "round-001/model holds training state but no registered model" in text
    assert "round-007 belongs to no round of the database" in text
    assert "round 0" not in text  # completed: nothing to say
    res = _doctor(url, data, "--campaign", "nope")
    assert res.exit_code == 1 and "no campaign named 'nope' (existing: crashed)" in res.output

    from bayesal.db import make_engine
    from bayesal.db.rounds import finish_round, open_round

    engine = make_engine(url)
    finish_round(engine, open_round(engine, "crashed").id, metrics={}, n_labelled=1)
    engine.dispose()
    (data / "campaigns" / "crashed" / "round-007").rmdir()
    res = _doctor(url, data, "--campaign", "crashed")
    assert res.output.strip() == "nothing left behind by an interrupted run of campaign crashed"


def test_a_running_campaign_is_not_stuck_and_cannot_be_run_twice(interrupted, tmp_path):
    from bayesal.flows.run_lock import CampaignBusyError, lock_holder, run_lock

    url, data = interrupted
    folder = data / "campaigns" / "crashed"
    assert lock_holder(folder) is None
    # another process holds the lock (a live run): doctor says so and reports nothing stuck
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from bayesal.flows.run_lock import run_lock\n"
         "with run_lock(sys.argv[1], 'crashed'):\n print('held', flush=True); time.sleep(60)",
         str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        info = lock_holder(folder)
        assert info["pid"] == holder.pid
        text = " ".join(_doctor(url, data).output.split())
        assert f"running now: process {holder.pid}" in text and "marked running" not in text
        with pytest.raises(CampaignBusyError, match=f"process {holder.pid}"), \
                run_lock(folder, "crashed"):
            pass
        (tmp_path / "c.yaml").write_text("name: crashed\ndata: {initial_files: [s.xyz]}\n"
                                         "explorer: {}\n")
        import ase.io

        ase.io.write(tmp_path / "s.xyz", rattled_waters(2, seed=3))
        res = runner.invoke(app, ["--database-url", url, "run", str(tmp_path / "c.yaml"),
                                  "--resume"])
        assert res.exit_code == 1
        assert f"campaign crashed is being run by process {holder.pid}" in res.output
    finally:
        holder.kill()
        holder.wait()
    # SIGKILLed holder: the kernel released the lock at once
    deadline = time.monotonic() + 5
    while lock_holder(folder) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock_holder(folder) is None
    with run_lock(folder, "crashed"):
        assert lock_holder(folder)["pid"] == os.getpid()
    assert lock_holder(folder) is None


def test_doctor_finds_a_temporary_api_whose_run_is_gone_and_fix_stops_it(tmp_path):
    """A stand-in for an orphaned temporary API: a process with the server's command line
    and Prefect's ephemeral-server environment whose parent (a shell) exited at once."""
    import psutil

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    fake = ("import time; time.sleep(120)  # uvicorn --factory "
            "prefect.server.api.server:create_app")
    subprocess.run(["sh", "-c", f"{sys.executable} -c '{fake}' >/dev/null 2>&1 &"],
                   env={**os.environ, "PREFECT__SERVER_EPHEMERAL": "1"}, check=True)
    deadline = time.monotonic() + 10
    orphan = None
    while orphan is None and time.monotonic() < deadline:
        orphan = next((p for p in psutil.process_iter(["cmdline"])
                       if fake in " ".join(p.info["cmdline"] or [])), None)
        time.sleep(0.1)
    assert orphan is not None
    try:
        from bayesal.db import make_engine, upgrade

        upgrade(make_engine(url))
        text = " ".join(_doctor(url, tmp_path).output.split())
        assert f"stale temporary Prefect API server: process {orphan.pid}" in text
        assert "--fix stops it" in text
        text = " ".join(_doctor(url, tmp_path, "--fix").output.split())
        assert "stopping it" in text
        orphan.wait(timeout=15)
        assert "stale" not in _doctor(url, tmp_path).output
    finally:
        if orphan.is_running():
            orphan.kill()


def test_end_with_parent_ends_an_orphan_with_sigterm(tmp_path):
    """A process that called end_with_parent (a deployment's flow run) gets SIGTERM soon
    after its parent (the worker) is SIGKILLed; before that it runs undisturbed."""
    import psutil

    child_code = ("import signal, sys, time\n"
                  "from bayesal.flows.run_lock import end_with_parent\n"
                  "signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], 'w')"
                  ".write('SIGTERM'), sys.exit(143)))\n"
                  "end_with_parent(poll_s=0.1)\n"
                  "open(sys.argv[1], 'w').write('watching')\n"
                  "time.sleep(60)\n")
    marker = tmp_path / "child.txt"
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {child_code!r}, "
                               f"{str(marker)!r}])\n"
                               "time.sleep(60)\n"])
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text() == "watching"):
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    (child,) = psutil.Process(parent.pid).children()
    time.sleep(0.5)
    assert child.is_running() and marker.read_text() == "watching"
    parent.kill()
    parent.wait()
    child.wait(timeout=10)  # not our child: psutil waits for it to end, with no status
    assert marker.read_text() == "SIGTERM"
