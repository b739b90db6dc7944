"""The campaign flow end to end under a real (temporary) Prefect API.

* replay labeler on the shared ethanol data, SQLite and PostgreSQL: rounds, labels per
  round, models, scores, artifacts, and a rerun that adds nothing;
* real PySCF (HF/STO-3G water) with the explorer as the only candidate source and one
  forced SCF failure in a round's batch;
* config errors refused before anything is written.
"""

from __future__ import annotations

import threading
from pathlib import Path

import ase.io
import pytest
import yaml
from helpers import TINY, ethanol_campaign, rattled_waters
from sqlalchemy import func, select


def _use_db(monkeypatch, url, data_dir):
    monkeypatch.setenv("BAYESAL_DATABASE_URL", url)
    monkeypatch.setenv("BAYESAL_DATA_DIR", str(data_dir))


def _artifact_keys(campaign: str) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(like_=campaign)))
    return {(a.key, a.type) for a in arts}


def test_replay_campaign_end_to_end_and_rerun_adds_nothing(prefect_api, shared_data, db_url,
                                                           tmp_path, monkeypatch):
    from bayesal.db import Label, Model, Round, Score, Structure, make_engine
    from bayesal.flows.campaign import campaign

    _use_db(monkeypatch, db_url, tmp_path / "data")
    config = ethanol_campaign(tmp_path, shared_data, finetune={"max_epochs": 2})
    result = campaign(str(config), resume=False)
    assert result["rounds"] == 3 and result["stop_reason"].startswith("max_rounds")

    engine = make_engine(db_url)
    with engine.connect() as conn:
        rounds = conn.execute(select(Round.id, Round.round_index, Round.status,
                                     Round.n_labelled, Round.metrics)
                              .order_by(Round.round_index)).all()
        assert [r.round_index for r in rounds] == [0, 1, 2]
        assert all(r.status == "completed" for r in rounds)
        # labels grow by the batch size per round, each recorded with its round
        assert [r.n_labelled for r in rounds] == [4, 4, 4]
        # finetune: round 0 from scratch, later rounds start from the previous round's model
        assert [r.metrics["warm_start"] for r in rounds] == [0.0, 1.0, 1.0]
        from bayesal.bayes_model.checkpoint import read_manifest
        model_dirs = sorted((tmp_path / "data" / "campaigns" / "eth").glob("round-*/model"))
        assert len(model_dirs) == 3
        assert [read_manifest(d).extra.get("init_from") for d in model_dirs] == [
            None, str(model_dirs[0]), str(model_dirs[1])]
        # round 0: the members' shared start and their own epochs; later rounds fine-tune
        epochs = [(m["epochs"], m.get("shared_epochs", 0))
                  for m in (read_manifest(d).members[0] for d in model_dirs)]
        assert [sum(e) for e in epochs] == [3, 2, 2] and epochs[0][1] == 2
        # keep_train_state: last (default): only the newest round keeps its resumable state
        assert [(d / "work").is_dir() for d in model_dirs] == [False, False, True]
        for r in rounds:
            n = conn.scalar(select(func.count()).select_from(Label)
                            .where(Label.round_id == r.id, Label.status == "ok"))
            assert n == 4
            # training set grows: 6 initial (5 train + 1 valid) + 4 per earlier round
            assert r.metrics["n_train_labels"] == 6 + 4 * r.round_index
            assert r.metrics["test_force_mae"] > 0 and "test_force_nll" in r.metrics
            # the dashboard's reliability curve (monotone in p) and its Prefect flow run
            curve = [r.metrics[f"test_force_reliability_p{q}"] for q in range(10, 100, 10)]
            assert curve == sorted(curve) and 0 <= curve[0] <= curve[-1] <= 1
            assert len(r.metrics["flow_run_id"]) == 36
            assert r.metrics["n_selected"] == 4 and r.metrics["n_scored"] > 0
        # the selected structures are exactly the ones labelled in that round
        for r in rounds:
            chosen = set(conn.scalars(select(Score.structure_id)
                                      .where(Score.round_id == r.id, Score.selected)))
            labelled = set(conn.scalars(select(Label.structure_id)
                                        .where(Label.round_id == r.id)))
            assert chosen == labelled and len(chosen) == 4
        # models: two members per round, files present with their sha256
        models = conn.execute(select(Model.round_id, Model.member_index, Model.checkpoint_path)
                              ).all()
        assert len(models) == 6
        from pathlib import Path
        assert all(Path(m.checkpoint_path).is_file() for m in models)
        # test structures are labelled but never trained on or scored
        test_ids = set(conn.scalars(select(Structure.id).where(Structure.source == "test")))
        assert len(test_ids) == 6
        assert not test_ids & set(conn.scalars(select(Score.structure_id)))
        n_labels = conn.scalar(select(func.count()).select_from(Label))
        assert n_labels == 6 + 6 + 12
    keys = _artifact_keys("eth")
    assert ("eth-rounds", "table") in keys and ("eth-progress", "progress") in keys
    assert {("eth-round-0", "markdown"), ("eth-round-2", "markdown")} <= keys

    # a rerun of the finished campaign adds nothing and counts no round twice
    again = campaign(str(config), resume=True)
    assert again["rounds"] == 3
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Label)) == n_labels
        assert conn.scalar(select(func.count()).select_from(Round)) == 3
    engine.dispose()

    # `bayesal status` of the campaign: every table readable at 80 columns, nothing cut
    from typer.testing import CliRunner

    from bayesal.cli import app

    res = CliRunner().invoke(app, ["--database-url", db_url, "status", "--campaign", "eth"])
    assert res.exit_code == 0, res.output
    assert "learning curve of eth" in res.output and "rounds of eth" in res.output
    assert "…" not in res.output and max(map(len, res.output.splitlines())) <= 80


def test_new_run_of_an_existing_campaign_needs_resume(prefect_api, shared_data, sqlite_url,
                                                      tmp_path, monkeypatch):
    from bayesal.flows.campaign import campaign
    from bayesal.tasks.policy import CampaignError

    _use_db(monkeypatch, sqlite_url, tmp_path / "data")
    config = ethanol_campaign(tmp_path, shared_data, name="twice", stop={"max_rounds": 1})
    campaign(str(config), resume=False)
    with pytest.raises(CampaignError, match=r"already has \d+ round\(s\) and \d+ label\(s\)"):
        campaign(str(config), resume=False)


def test_an_undertrained_round_is_failed_not_scored_and_resume_trains_again(
        prefect_api, shared_data, sqlite_url, tmp_path, monkeypatch):
    """A time budget too small to train (0 epochs) gives an under-trained model: the round
    is marked failed with the verdict, nothing is scored or labelled with it, no model is
    registered, and the run stops with a message saying what to change. With the budget
    raised, --resume opens the next round, which trains from scratch (the failed round's
    model is not warm-started from) and completes."""
    import yaml
    from sqlalchemy import func, select

    from bayesal.db import Model, Round, Score, make_engine
    from bayesal.flows.campaign import campaign
    from bayesal.tasks.policy import CampaignError

    _use_db(monkeypatch, sqlite_url, tmp_path / "data")
    config = ethanol_campaign(tmp_path, shared_data, name="hurried",
                              finetune={"max_epochs": 2}, stop={"max_rounds": 1})
    cfg = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**cfg, "max_train_minutes": 0.0001}))
    with pytest.raises(CampaignError, match=r"round 0 failed: .*under-trained.*time budget "
                       r"stopped training after 0 epoch.*--resume"):
        campaign(str(config), resume=False)
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        (status, metrics), = conn.execute(select(Round.status, Round.metrics)).all()
        assert conn.scalar(select(func.count()).select_from(Model)) == 0
        assert conn.scalar(select(func.count()).select_from(Score)) == 0
    assert status == "failed" and metrics["failed"] == "under-trained model"
    assert "min_epochs" in metrics["problems"] and metrics["epochs"] == 0

    config.write_text(yaml.safe_dump(cfg))  # the budget lifted
    result = campaign(str(config), resume=True)
    assert result["rounds"] == 1
    with engine.connect() as conn:
        rounds = conn.execute(select(Round.round_index, Round.status, Round.metrics)
                              .order_by(Round.round_index)).all()
    engine.dispose()
    assert [(r.round_index, r.status) for r in rounds] == [(0, "failed"), (1, "completed")]
    assert rounds[1].metrics["warm_start"] == 0.0  # not from the failed round's model


class _FailOnce:
    """PySCF labeler whose n-th calculation runs with max_cycle=1: a real SCF failure."""

    def __init__(self, good, bad, fail_call: int) -> None:
        self.good, self.bad, self.fail_call = good, bad, fail_call
        self.calls, self.lock, self.failed = 0, threading.Lock(), []

    def __getattr__(self, name):
        return getattr(self.good, name)

    def label(self, atoms):
        with self.lock:
            self.calls += 1
            fail = self.calls == self.fail_call
        if fail:
            self.failed.append(atoms.info["structure_id"])
        return (self.bad if fail else self.good).label(atoms)


@pytest.mark.slow
def test_pyscf_campaign_with_explorer_survives_a_forced_scf_failure(
        prefect_api, sqlite_url, tmp_path, monkeypatch):
    from bayesal.db import Label, Model, Round, Structure, make_engine
    from bayesal.labelers import PySCFLabeler
    from bayesal.tasks import campaign as campaign_tasks

    _use_db(monkeypatch, sqlite_url, tmp_path / "data")
    ase.io.write(tmp_path / "start.xyz", rattled_waters(6, seed=1))
    ase.io.write(tmp_path / "test.xyz", rattled_waters(3, seed=2))
    cfg = {"name": "water", "data": {"initial_files": ["start.xyz"],
                                     "test_files": ["test.xyz"], "valid_fraction": 0.2},
           "explorer": {"temperatures_K": [300.0], "steps": 12, "timestep_fs": 0.25,
                        "record_every": 3, "seeds_per_round": 2, "max_force_std": 1e3},
           "members": 2, "model": TINY, "train": {"max_epochs": 3, "batch_size": 2},
           "acquisition": {"batch_size": 3, "selection": "top-k"},
           "labeler": {"kind": "pyscf", "method": "hf", "basis": "sto-3g", "workers": 2},
           "stop": {"max_rounds": 2}}
    (tmp_path / "water.yaml").write_text(yaml.safe_dump(cfg))
    good = PySCFLabeler("hf", "sto-3g", timeout_s=120)
    bad = PySCFLabeler("hf", "sto-3g", timeout_s=120, max_cycle=1)
    # calls 1-9 label the 6 initial + 3 test structures; call 10 is in round 0's batch
    wrapper = _FailOnce(good, bad, fail_call=10)
    monkeypatch.setattr(campaign_tasks, "build_labeler", lambda spec, guess_dir: wrapper)
    from bayesal.flows.campaign import campaign

    result = campaign(str(tmp_path / "water.yaml"), resume=False)
    assert result["rounds"] == 2

    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        failed = conn.execute(select(Label.structure_id, Label.status, Label.round_id,
                                     Label.error).where(Label.status != "ok")).all()
        assert [f.structure_id for f in failed] == wrapper.failed
        assert failed[0].status == "scf_failed" and "converge" in failed[0].error.lower()
        rounds = conn.execute(select(Round.id, Round.round_index, Round.status,
                                     Round.metrics).order_by(Round.round_index)).all()
        assert failed[0].round_id == rounds[0].id
        assert [r.status for r in rounds] == ["completed", "completed"]
        assert rounds[0].metrics["n_ok"] == 2 and rounds[0].metrics["n_failed"] == 1
        # round 1 trained on the ok labels only: 6 initial + 2 from round 0
        assert rounds[1].metrics["n_train_labels"] == 8
        hyper = conn.scalars(select(Model.hyperparameters)
                             .where(Model.round_id == rounds[1].id)).first()
        assert hyper["n_train"] + hyper["n_valid"] == 8
        # candidates came from exploration with the round's model, from labelled seeds
        explored = conn.execute(select(Structure.id, Structure.parent_id, Structure.info)
                                .where(Structure.source == "explored")).all()
        assert explored and all(e.parent_id is not None for e in explored)
        assert {e.info["explored_round"] for e in explored} == {0, 1}
        assert rounds[0].metrics["n_explored"] > 0
        # labelled explored structures have real HF energies (water ~ -2038 eV)
        energies = conn.scalars(select(Label.energy).join(Structure)
                                .where(Structure.source == "explored",
                                       Label.status == "ok")).all()
        assert len(energies) == 2 + 3 and all(-2050 < e < -2030 for e in energies)
    engine.dispose()


@pytest.mark.parametrize("edit, message", [
    ({"acquisition": {"batchsize": 3}}, "acquisition.batchsize"),
    ({"acquisition": {"batch_size": -3}}, "acquisition.batch_size"),
    ({"data": {"pool_files": ["missing.xyz"], "initial_random": 2}}, "missing.xyz"),
    ({"labeler": {"kind": "pyscf", "method": "pbe-no-such"}}, "unknown functional"),
    ({"labeler": {"kind": "pyscf", "method": "hf", "basis": "no-such-basis"}},
     "unknown basis set"),
    ({"nan_in_pool": 3}, "pool.xyz, frame 3, field 'positions'"),
])
def test_config_errors_are_clear_and_write_nothing(edit, message, shared_data, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    edit = dict(edit)
    bad_frame = edit.pop("nan_in_pool", None)
    config = ethanol_campaign(tmp_path, shared_data, **edit)
    if bad_frame is not None:  # errors found in data files used to come after Prefect
        frames = ase.io.read(tmp_path / "pool.xyz", ":")  # started, with a campaign row
        frames[bad_frame].positions[0, 0] = float("nan")
        ase.io.write(tmp_path / "pool.xyz", frames)
    db = tmp_path / "nothing.db"
    env = {**os.environ, "BAYESAL_DATABASE_URL": f"sqlite:///{db}",
           "BAYESAL_DATA_DIR": str(tmp_path / "data")}
    bayesal = Path(sys.executable).with_name("bayesal")
    out = subprocess.run([str(bayesal), "run", str(config)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 1
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 3, out.stderr
    assert not db.exists() and not (tmp_path / "data").exists()


def test_dask_runner_settings_from_the_yaml(shared_data, tmp_path):
    """SLURM/PBS cannot run here: check the runner the YAML turns into."""
    from bayesal.flows.campaign import make_task_runner
    from bayesal.flows.campaign_config import load_campaign_config

    config = ethanol_campaign(tmp_path, shared_data, runner={
        "kind": "dask", "dask": {"cluster": "slurm", "jobs": 20, "cores": 8,
                                 "memory": "16GB", "walltime": "02:00:00",
                                 "queue": "compute", "account": "proj"}})
    runner = make_task_runner(load_campaign_config(config))
    assert runner.cluster_class == "dask_jobqueue.SLURMCluster"
    assert runner.cluster_kwargs == {"cores": 8, "memory": "16GB", "walltime": "02:00:00",
                                     "processes": 1, "queue": "compute", "account": "proj",
                                     "scheduler_options": {
                                         "dashboard_address": "127.0.0.1:8787"}}
    assert runner.adapt_kwargs == {"minimum": 0, "maximum": 20}
    import dask_jobqueue  # the class named above exists

    assert dask_jobqueue.SLURMCluster and dask_jobqueue.PBSCluster
    local = make_task_runner(load_campaign_config(ethanol_campaign(tmp_path, shared_data)))
    assert type(local).__name__ == "ThreadPoolTaskRunner"


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


@pytest.mark.parametrize("tls", [False, True])
def test_a_local_dask_cluster_listens_on_loopback_only(tls, shared_data, tmp_path):
    """Dask's dashboard has no login: the scheduler and the dashboard of a local cluster
    bind 127.0.0.1, never every interface (it used to be 0.0.0.0:8787); ``tls`` encrypts
    and authenticates the scheduler's connections."""
    from distributed import LocalCluster

    from bayesal.flows.campaign import make_task_runner
    from bayesal.flows.campaign_config import load_campaign_config

    config = ethanol_campaign(tmp_path, shared_data, runner={
        "kind": "dask", "dask": {"cluster": "local", "dashboard_address": "127.0.0.1:0",
                                 "tls": tls}})
    kwargs = {**make_task_runner(load_campaign_config(config)).cluster_kwargs, "n_workers": 0}
    with LocalCluster(**kwargs) as cluster:
        assert cluster.scheduler.address.startswith("tls://" if tls else "tcp://")
        ports = {cluster.scheduler.port, cluster.scheduler.http_server.port}
        for port in ports:
            assert _listening_addresses(port) == {"0100007F"}, port  # 127.0.0.1 only


@pytest.mark.slow
def test_scoring_and_labels_fan_out_over_a_local_dask_cluster(prefect_api, shared_data,
                                                              sqlite_url, tmp_path,
                                                              monkeypatch):
    """Scoring shards and labels both run as tasks on the Dask workers; every candidate is
    scored once and the selection is whole."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from bayesal.db import Label, Round, Score, make_engine
    from bayesal.flows.campaign import campaign

    _use_db(monkeypatch, sqlite_url, tmp_path / "data")
    config = ethanol_campaign(tmp_path, shared_data, name="dask", stop={"max_rounds": 1},
                              acquisition={"shard_size": 10},
                              runner={"kind": "dask", "dask": {"cluster": "local",
                                                               "jobs": 2, "cores": 1}})
    assert campaign(str(config), resume=False)["rounds"] == 1
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        (rid,) = conn.scalars(select(Round.id).where(Round.status == "completed")).all()
        provenance = conn.scalars(select(Label.provenance).where(Label.round_id == rid)).all()
        scored = conn.scalars(select(Score.structure_id).where(Score.round_id == rid)).all()
        ranks = conn.scalars(select(Score.rank).where(Score.round_id == rid,
                                                      Score.selected)).all()
    engine.dispose()
    assert len(provenance) == 4
    assert len(scored) == len(set(scored)) == 34 and sorted(ranks) == [0, 1, 2, 3]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_="score-round-0-from-")))
    names = {r.name for r in runs if r.state.is_completed()}  # (the API is shared by tests)
    assert {f"score-round-0-from-{k}" for k in (0, 10, 20, 30)} <= names
