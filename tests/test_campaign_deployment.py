"""A real Prefect server on 127.0.0.1, a process worker, and a deployment run of a tiny
campaign going through them (`bayesal deploy` + `prefect deployment run --watch`)."""

from __future__ import annotations

import contextlib
import os
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


@pytest.mark.slow
def test_deployment_runs_a_campaign_through_server_and_worker(shared_data, tmp_path):
    from bayesal.db import Round, make_engine

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    db_url = f"sqlite:///{tmp_path / 'campaign.db'}"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "BAYESAL_DATABASE_URL": db_url, "BAYESAL_DATA_DIR": str(tmp_path / "data")}
    config = ethanol_campaign(tmp_path, shared_data, name="deployed", n_pool=20,
                              stop={"max_rounds": 1})
    files = contextlib.ExitStack()
    logs = {name: files.enter_context((tmp_path / f"{name}.log").open("w"))
            for name in ("server", "worker")}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=logs["server"],
                              stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        _wait_healthy(api, server)
        out = subprocess.run([str(BIN / "bayesal"), "deploy", str(config), "--pool",
                              "test-pool", "--name", "tiny"], env=env, capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "campaign/tiny" in out.stdout
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool",
                                   "test-pool", "--type", "process"], env=env,
                                  stdout=logs["worker"], stderr=subprocess.STDOUT,
                                  start_new_session=True)
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
    engine.dispose()
    assert [tuple(r) for r in rounds] == [(0, "completed", 4)]
