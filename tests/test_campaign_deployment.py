"""A real Prefect server on 127.0.0.1, a process worker, and a deployment run of a tiny
campaign going through them (`bayesal deploy` + `prefect deployment run --watch`)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import ethanol_campaign
from sqlalchemy import select

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "prefect server exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"prefect server at {url} not healthy after {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start_worker(env: dict[str, str], log) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "test-pool",
                             "--type", "process"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_a_deployed_campaign_survives_its_flow_run_and_its_worker_being_killed(
        shared_data, tmp_path):
    """A real server and process worker run a deployed campaign (`bayesal deploy --run`).
    SIGKILL mid-training (the OOM killer, a node drained), first of the process the worker
    runs the campaign in, then, in the next run, of the worker itself (its flow run must
    then end too, not run on unsupervised): each time the flow run is marked Crashed and
    its process is gone, and the next deployment run (on a restarted worker) resumes the
    campaign from the database and completes it: no duplicate label, rounds counted once."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from bayesal.db import Label, Round, make_engine
    from bayesal.flows.run_lock import lock_holder

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    db_url = f"sqlite:///{tmp_path / 'campaign.db'}"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "BAYESAL_DATABASE_URL": db_url, "BAYESAL_DATA_DIR": str(tmp_path / "data")}
    config = ethanol_campaign(tmp_path, shared_data, name="killed", n_pool=20,
                              train={"max_epochs": 40}, stop={"max_rounds": 2})
    folder = tmp_path / "data" / "campaigns" / "killed"
    files = contextlib.ExitStack()
    logs = {name: files.enter_context((tmp_path / f"{name}.log").open("w"))
            for name in ("server", "worker")}
    deadline = time.monotonic() + 900

    def kill_when_training(round_dir: str, pid) -> None:
        while not list(folder.glob(f"{round_dir}/model/work/*")) or lock_holder(folder) is None:
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.2)
        os.kill(pid() if callable(pid) else pid, signal.SIGKILL)

    def wait_crashed(flow_run_id: str) -> None:
        state = None
        while time.monotonic() < deadline:
            with temporary_settings({PREFECT_API_URL: api}), \
                    get_client(sync_client=True) as client:
                state = client.read_flow_run(flow_run_id).state
            if state is not None and state.is_final() and lock_holder(folder) is None:
                break
            time.sleep(1)
        assert state is not None and state.type.value == "CRASHED", state
        assert lock_holder(folder) is None  # the flow-run process has ended

    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=logs["server"],
                              stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        _wait_healthy(api, server)
        worker = _start_worker(env, logs["worker"])
        out = subprocess.run([str(BIN / "bayesal"), "deploy", str(config), "--pool",
                              "test-pool", "--name", "tiny", "--run"], env=env,
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "campaign/tiny" in out.stdout
        first = out.stdout.split("started flow run ")[1].split()[0]
        kill_when_training("round-000", lambda: lock_holder(folder)["pid"])
        wait_crashed(first)

        # output not streamed through the worker: a dead worker's broken pipe cannot end
        # the flow run by chance, only bayesal's watch of its parent does
        out = subprocess.run([str(BIN / "prefect"), "deployment", "run", "campaign/tiny",
                              "--job-variable", "stream_output=false"], env=env,
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        second = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)
        kill_when_training("round-001", worker.pid)
        worker.wait()
        wait_crashed(second)

        worker = _start_worker(env, logs["worker"])
        run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "campaign/tiny",
                              "--watch", "--watch-timeout", "600"], env=env,
                             capture_output=True, text=True, timeout=660)
        worker_log = (tmp_path / "worker.log").read_text()
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + worker_log[-4000:]
        assert "Completed" in run.stdout + run.stderr
    finally:
        for proc in (worker, server):
            if proc is not None:
                _stop(proc)
        files.close()
    engine = make_engine(db_url)
    with engine.connect() as conn:
        rounds = conn.execute(select(Round.round_index, Round.status, Round.n_labelled)).all()
        labels = conn.execute(select(Label.structure_id, Label.settings_hash)).all()
    engine.dispose()
    assert sorted(tuple(r) for r in rounds) == [(0, "completed", 4), (1, "completed", 4)]
    assert len(labels) == len(set(labels)) == 6 + 6 + 4 * 2  # initial + test + 2 batches
