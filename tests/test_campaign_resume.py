"""Crash and resume: `bayesal run` SIGKILLed during labeling and during training, then run
again with --resume. The database must end exactly as an uninterrupted campaign would:
every selected structure labelled once, nothing lost, rounds contiguous and counted once.
Real PySCF (HF/STO-3G water) and a real Prefect API (the test harness's server)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import pytest
import yaml
from helpers import TINY, rattled_waters
from sqlalchemy import func, select

BATCH, INITIAL, TEST, ROUNDS = 4, 4, 2, 2


def _config(folder: Path, max_epochs: int = 60, **train) -> Path:
    ase.io.write(folder / "pool.xyz", rattled_waters(30, seed=3))
    ase.io.write(folder / "test.xyz", rattled_waters(TEST, seed=4))
    cfg = {"name": "crash", "data": {"pool_files": ["pool.xyz"], "initial_random": INITIAL,
                                     "test_files": ["test.xyz"], "valid_fraction": 0.25},
           "members": 2, "model": TINY,
           "train": {"max_epochs": max_epochs, "batch_size": 2, **train},
           "acquisition": {"batch_size": BATCH, "selection": "top-k"},
           "labeler": {"kind": "pyscf", "method": "hf", "basis": "sto-3g", "workers": 1},
           "stop": {"max_rounds": ROUNDS}}
    path = folder / "crash.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _round_labels(engine) -> int:
    from bayesal.db import Label

    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(Label)
                           .where(Label.round_id.is_not(None)))


def _training(data_dir: Path):
    def check(engine) -> bool:
        from bayesal.db import Model

        states = list((data_dir / "campaigns" / "crash").glob(
            "round-*/model/work/member_*/train_state.pt"))
        with engine.connect() as conn:
            models = conn.scalar(select(func.count()).select_from(Model))
        return bool(states) and models == 0
    return check


def _wait_for(proc: subprocess.Popen, log: Path, ready, what: str) -> None:
    """Poll ``ready()`` (an exception counts as not yet: the schema may not exist) while the
    campaign process runs; fail with its log if it exits first or takes over 10 minutes."""
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the campaign never reached " + what
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["labeling", "training"])
def test_sigkill_and_resume_loses_and_duplicates_nothing(phase, prefect_api, sqlite_url,
                                                        tmp_path):
    from bayesal.db import Label, Round, Score, make_engine

    config = _config(tmp_path)
    env = {**os.environ, "BAYESAL_DATABASE_URL": sqlite_url,
           "BAYESAL_DATA_DIR": str(tmp_path / "data"), "PREFECT_API_URL": prefect_api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    bayesal = str(Path(sys.executable).with_name("bayesal"))
    engine = make_engine(sqlite_url)
    ready = (lambda e: _round_labels(e) >= 1) if phase == "labeling" else \
        _training(tmp_path / "data")
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([bayesal, "run", str(config)], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            _wait_for(proc, tmp_path / "first.log", lambda: ready(engine), phase)
        finally:
            proc.send_signal(signal.SIGKILL)  # the main process only, like an OOM kill
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    if phase == "labeling":
        assert _round_labels(engine) < BATCH * ROUNDS  # killed with labels still to do
    time.sleep(1)  # children die with their parent (PR_SET_PDEATHSIG)

    out = subprocess.run([bayesal, "run", str(config), "--resume"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    with engine.connect() as conn:
        rounds = conn.execute(select(Round.id, Round.round_index, Round.status)
                              .order_by(Round.round_index)).all()
        assert [(r.round_index, r.status) for r in rounds] == [
            (k, "completed") for k in range(ROUNDS)]
        labels = conn.execute(select(Label.structure_id, Label.settings_hash, Label.status,
                                     Label.round_id)).all()
        # what an uninterrupted run ends with: initial + test + a full batch per round
        assert len(labels) == INITIAL + TEST + BATCH * ROUNDS
        assert all(lab.status == "ok" for lab in labels)
        assert len({(lab.structure_id, lab.settings_hash) for lab in labels}) == len(labels)
        for r in rounds:  # nothing lost: every selected structure has its label
            chosen = set(conn.scalars(select(Score.structure_id)
                                      .where(Score.round_id == r.id, Score.selected)))
            got = {lab.structure_id for lab in labels if lab.round_id == r.id}
            assert chosen == got and len(got) == BATCH
    engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("sig, group", [(signal.SIGTERM, False), (signal.SIGKILL, False),
                                        (signal.SIGTERM, True), (signal.SIGINT, True)],
                         ids=["sigterm", "sigkill", "group-sigterm", "group-sigint"])
def test_a_killed_run_leaves_no_process_behind(sig, group, sqlite_url, tmp_path):
    """`bayesal run` with its own temporary Prefect API, killed during training, leaves no
    process it started (the temporary Prefect server, the ensemble members). SIGTERM (a
    scheduler's scancel, `kill`) used to orphan the server; now it exits with 143 and a
    message saying how to continue. SIGKILL (the OOM killer, scancel after its grace period)
    runs no handler at all: the members die with their parent and a reaper stops the server.
    SIGTERM or SIGINT to the whole process group (scancel, Ctrl-C in a terminal) used to kill
    the temporary API first and leave `run` retrying it forever; now it exits 143 / 130."""
    import psutil

    from bayesal.db import make_engine

    # members would train for hours: no early stopping, no stop at a small learning rate
    config = _config(tmp_path, max_epochs=10**6, patience=10**6, min_lr=1e-300,
                     shared_start=0)  # members from the start: processes to see
    # no OMP_NUM_THREADS=1 left in this process by a Dask test's nanny: members must run
    # in parallel processes for the test to see them
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")
           and k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env.update(BAYESAL_DATABASE_URL=sqlite_url, BAYESAL_DATA_DIR=str(tmp_path / "data"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=str(tmp_path / "ph"))
    bayesal = str(Path(sys.executable).with_name("bayesal"))
    engine = make_engine(sqlite_url)
    started: dict[int, tuple[psutil.Process, str]] = {}

    def seen(word: str) -> bool:
        return any(word in cmd for _, cmd in started.values())

    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen([bayesal, "run", str(config)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=group)

        def training_with_server_and_members() -> bool:
            for p in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    # the command line read again on every poll: a child seen between its
                    # fork and its exec still shows its parent's (`bayesal run`), and kept
                    # from then on the server or the members were never recognised
                    first = started.get(p.pid, (p, ""))[0]
                    started[p.pid] = (first, " ".join(p.cmdline()))
            return (_training(tmp_path / "data")(engine) and seen("uvicorn")
                    and seen("multiprocessing"))

        try:
            _wait_for(proc, tmp_path / "run.log", training_with_server_and_members, "training")
        finally:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            try:
                returncode = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for p in [proc, *(q for q, _ in started.values())]:
                    with contextlib.suppress(psutil.Error, OSError):
                        p.kill()
                raise AssertionError(f"bayesal run still running 60 s after {sig.name}") from None
    text = (tmp_path / "run.log").read_text()
    _, alive = psutil.wait_procs([p for p, _ in started.values()], timeout=10)
    try:
        assert not alive, [started[p.pid][1] for p in alive]
    finally:
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
    if sig != signal.SIGKILL:
        assert returncode == 128 + sig, text[-3000:]
        assert f"stopped by {sig.name}" in text and "--resume" in text
    else:
        assert returncode == -signal.SIGKILL
    engine.dispose()
