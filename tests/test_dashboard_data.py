"""The data and figures behind every dashboard view, on a 3-round campaign written with db/
code (tests/dashboard_fixture.py), on SQLite and PostgreSQL; the dashboard's engine is
read-only; `bayesal dashboard` refuses a database it cannot read."""

from __future__ import annotations

import io

import dashboard_fixture as fx
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from bayesal.dashboard import data, plots


@pytest.fixture
def demo(engine, db_url):
    """(read-only engine, structure ids by role) of the demo campaign."""
    from bayesal.db import readonly_engine

    ids = fx.build_demo(engine)
    ro = readonly_engine(db_url)
    yield ro, ids
    ro.dispose()


def test_overview_counts_budget_and_state(demo):
    ro, _ = demo
    assert data.campaign_names(ro) == ["demo", "fresh"]
    ov = data.overview(ro, "demo")
    assert (ov.n_rounds, ov.n_completed, ov.running_round, ov.state) == (3, 3, None, "idle")
    assert (ov.n_ok, ov.n_failed) == (12, 1)  # 4 initial + 3 test + 5 of 6 round labels
    assert (ov.labels_requested, ov.label_budget) == (6, 10)
    assert ov.structures == {"initial": 4, "test": 3, "pool": 12}
    assert ov.last_round["round"] == 2
    assert ov.last_round["metrics"]["flow_run_id"].endswith("2")
    fresh = data.overview(ro, "fresh")
    assert (fresh.state, fresh.n_rounds, fresh.n_ok, fresh.structures) == (
        "new", 0, 0, {"pool": 2})
    assert data.rounds_frame(ro, "fresh").empty
    assert data.learning_curves(ro, "fresh").empty
    assert data.calibration_frame(ro, "fresh").empty
    assert data.reliability_frame(ro, "fresh").empty
    assert data.scored_rounds(ro, "fresh") == []
    assert data.labels_frame(ro, "fresh").empty
    assert data.labeling_by_round(data.overview(ro, "fresh")).empty


def test_unknown_campaign_lists_existing(demo):
    ro, _ = demo
    for call in (data.overview, data.rounds_frame, data.learning_curves, data.labels_frame,
                 data.scored_rounds):
        with pytest.raises(data.UnknownCampaign, match=r"'nope'.*demo, fresh"):
            call(ro, "nope")


def test_running_round_is_reported(engine, db_url):
    from bayesal.db import readonly_engine
    from bayesal.db.rounds import open_round

    fx.build_demo(engine)
    open_round(engine, "demo")
    ro = readonly_engine(db_url)
    ov = data.overview(ro, "demo")
    assert (ov.state, ov.running_round, ov.n_rounds, ov.n_completed) == ("running", 3, 4, 3)
    # an open round has no metrics yet: it is listed but not on the learning curve
    assert data.rounds_frame(ro, "demo")["status"].tolist()[-1] == "running"
    assert sorted(data.learning_curves(ro, "demo")["round"].unique()) == [0, 1, 2]
    ro.dispose()


def test_round_table_values(demo):
    ro, _ = demo
    df = data.rounds_frame(ro, "demo")
    assert df["round"].tolist() == [0, 1, 2]
    assert df["training labels"].tolist() == fx.TRAIN_LABELS
    assert df["failed labels"].tolist() == [0, 1, 0]
    np.testing.assert_allclose(df["test F MAE (meV/Å)"], np.array(fx.FORCE_MAE) * 1000)
    np.testing.assert_allclose(df["test E MAE (meV)"], np.array(fx.ENERGY_MAE) * 1000)
    np.testing.assert_allclose(df["F miscal. area"], fx.MISCAL)
    assert df["selected max score"].isna().all()  # not in the fixture's metrics: blank


def test_learning_curves_per_test_set(demo):
    ro, _ = demo
    curves = data.learning_curves(ro, "demo")
    force = curves[curves["metric"] == "force MAE (meV/Å)"]
    assert set(force["test_set"]) == {"all", "water_a"}
    for name, expected in (("all", fx.FORCE_MAE), ("water_a", fx.FORCE_MAE_A)):
        part = force[force["test_set"] == name].sort_values("round")
        assert part["labels"].tolist() == fx.TRAIN_LABELS
        np.testing.assert_allclose(part["value"], np.array(expected) * 1000)
    nll = curves[(curves["metric"] == "force NLL (nats)") & (curves["test_set"] == "all")]
    np.testing.assert_allclose(nll.sort_values("round")["value"], fx.FORCE_NLL)
    fig = plots.learning_curve_figure(curves, "force MAE (meV/Å)")
    traces = {t.name: (list(t.x), list(t.y)) for t in fig.data}
    assert traces["all"] == (fx.TRAIN_LABELS, [pytest.approx(v * 1000) for v in fx.FORCE_MAE])


def test_calibration_and_reliability(demo):
    ro, _ = demo
    cal = data.calibration_frame(ro, "demo")
    np.testing.assert_allclose(cal["force_miscal_area"], fx.MISCAL)
    np.testing.assert_allclose(cal["force_miscal_area_recal"], np.array(fx.MISCAL) / 2)
    np.testing.assert_allclose(cal["force_spearman"], fx.SPEARMAN)
    assert cal["energy_miscal_area"].isna().all()
    rel = data.reliability_frame(ro, "demo")
    assert set(rel["quantity"]) == {"force"} and set(rel["variant"]) == {"raw"}
    one = rel[rel["round"] == 1].sort_values("expected")
    np.testing.assert_allclose(one["expected"], np.linspace(0, 1, 11))
    np.testing.assert_allclose(one["observed"], [0.0, *fx.RELIABILITY[1], 1.0])
    fig = plots.reliability_figure(rel, "force", "raw")
    assert [t.name for t in fig.data] == ["calibrated", "round 0", "round 1", "round 2"]
    np.testing.assert_allclose(fig.data[2].y, [0.0, *fx.RELIABILITY[1], 1.0])


def test_scores_pool_vs_selected(demo):
    ro, ids = demo
    assert data.scored_rounds(ro, "demo") == [0, 1, 2]
    for k, n_candidates in ((0, 12), (1, 10), (2, 8)):
        s = data.scores_frame(ro, "demo", k)
        assert len(s) == n_candidates and s["structure_id"].is_unique
        chosen = s[s["selected"]].sort_values("rank")
        assert chosen["structure_id"].tolist() == ids["selected"][k]
        assert chosen["rank"].tolist() == [0, 1]
        assert chosen["score"].min() > s[~s["selected"]]["score"].max()
        assert {"bald_e", "bald_f", "energy_std", "max_force_std"} <= set(s.columns)
    assert data.scores_frame(ro, "demo", 7).empty
    # aggregates in SQL; a bounded sample keeps the selected batch and spreads over the rest
    agg = data.score_overview(ro, "demo", 0)
    full = data.scores_frame(ro, "demo", 0)
    assert (agg.n, agg.n_selected, agg.acquisition) == (12, 2, "bald-ef")
    assert agg.mean == pytest.approx(full["score"].mean())
    assert agg.mean_selected == pytest.approx(full[full["selected"]]["score"].mean())
    sample = data.score_sample_frame(ro, "demo", 0, max_rows=6)
    assert len(sample) <= 6 and sample["selected"].sum() == 2
    assert set(sample["structure_id"]) <= set(full["structure_id"])
    assert sample["score"].is_monotonic_decreasing
    assert data.score_sample_frame(ro, "demo", 0, max_rows=100).shape == full.shape
    assert data.score_overview(ro, "demo", 7).n == 0 and data.score_sample_frame(
        ro, "demo", 7).empty
    s = data.scores_frame(ro, "demo", 2)
    fig = plots.score_figure(s, "bald_f")
    assert [len(t.x) for t in fig.data] == [6, 2]  # pool (not selected), selected


def test_labels_table_filters_and_labeling_stats(demo):
    ro, ids = demo
    everything = data.labels_frame(ro, "demo")
    assert len(everything) == 13 and everything["label_id"].is_unique
    failed = data.labels_frame(ro, "demo", status=["scf_failed"])
    assert failed[["structure_id", "round", "error"]].values.tolist() == [
        [ids["selected"][1][1], 1, "SCF not converged"]]
    assert len(data.labels_frame(ro, "demo", source=["test"])) == 3
    round0 = data.labels_frame(ro, "demo", rounds=[0])
    assert sorted(round0["structure_id"]) == sorted(ids["selected"][0])
    assert len(data.labels_frame(ro, "demo", formula="H2O")) == 13
    assert data.labels_frame(ro, "demo", formula="CH4").empty
    assert len(data.labels_frame(ro, "demo", limit=2)) == 2
    # the Data tab's filters offer exactly the values present, from the overview's groups
    offer = data.label_filters(data.overview(ro, "demo"))
    assert offer.total == len(everything)
    assert offer.status == sorted(everything["status"].unique())
    assert offer.source == sorted(everything["source"].unique())
    assert offer.rounds == sorted(everything["round"].dropna().astype(int).unique()) == [0, 1, 2]
    assert offer.formula == ["H2O"]
    assert data.label_filters(data.overview(ro, "fresh")).total == 0
    setup = everything[everything["round"].isna()]
    assert sorted(setup["structure_id"]) == sorted(ids["initial"] + ids["test"])
    csv = everything.to_csv(index=False)
    assert csv.count("\n") == 14  # header + 13 rows
    stats = data.labeling_by_round(data.overview(ro, "demo"))
    assert stats["round"].tolist() == ["setup", "0", "1", "2"]
    assert stats["labels"].tolist() == [7, 2, 2, 2]
    assert stats["failed"].tolist() == [0, 0, 1, 0]
    assert stats.loc[2, "failures"] == "scf_failed 1"
    assert stats.loc[2, "mean wall s"] == pytest.approx((fx.WALL + 3.0) / 2)
    assert stats.loc[2, "max wall s"] == pytest.approx(3.0)
    assert stats.loc[1, "mean scf cycles"] == pytest.approx(fx.SCF)
    assert stats.loc[2, "mean scf cycles"] == pytest.approx((fx.SCF + 50) / 2)
    # pages: newest first, no row twice, together all of them; the count agrees
    pages = [data.labels_frame(ro, "demo", limit=5, offset=o) for o in (0, 5, 10)]
    assert [len(p) for p in pages] == [5, 5, 3]
    assert pd.concat(pages)["label_id"].tolist() == everything["label_id"].tolist()
    assert data.label_count(ro, "demo") == 13
    assert data.label_count(ro, "demo", status=["scf_failed"], rounds=[1]) == 1
    assert data.label_count(ro, "demo", formula="CH4") == 0
    ov = data.overview(ro, "demo")
    for filters in ({}, {"status": ["scf_failed"]}, {"rounds": [0, 2]},
                    {"status": ["ok"], "rounds": [1]}):
        assert ov.count_labels(**filters) == data.label_count(ro, "demo", **filters) == len(
            data.labels_frame(ro, "demo", **filters)), filters
    assert data.label_count(ro, "demo", source=["test", "pool"]) == 9
    lines = data.labels_csv(ro, "demo", limit=4, source=["test"]).decode().splitlines()
    assert lines[0].split(",") == data.LABEL_COLUMNS and len(lines) == 1 + 3
    fig = plots.labeling_figure(data.labels_timeline(ro, "demo"))
    points = {(t.name, t.xaxis): len(t.y) for t in fig.data}
    assert points[("ok", "x")] == 12 and points[("scf_failed", "x")] == 1
    newest = data.labels_timeline(ro, "demo", limit=4)
    assert newest["created"].tolist() == everything["created"].head(4).tolist()
    fig = plots.labeling_figure(newest, total=13)
    assert "newest 4 of 13 labels" in fig.layout.title.text


def test_structure_detail_and_xyz(demo):
    import ase.io

    ro, ids = demo
    sid = ids["selected"][1][0]
    d = data.structure_detail(ro, "demo", sid)
    assert (d["formula"], d["n_atoms"], d["source"]) == ("H2O", 3, "pool")
    assert [lab["status"] for lab in d["labels"]] == ["ok"]
    assert d["labels"][0]["forces"].shape == (3, 3)
    assert d["score"]["round"] == 1 and d["score"]["selected"] is True
    assert {"bald_e", "bald_f", "energy_std", "max_force_std"} <= set(d["score"])
    test = data.structure_detail(ro, "demo", ids["test"][0])
    assert test["score"] is None and test["source"] == "test"
    fresh_id = max(ids["pool"]) + 1  # the first structure of campaign "fresh"
    with pytest.raises(KeyError, match="not in campaign 'demo'"):
        data.structure_detail(ro, "demo", fresh_id)
    atoms = ase.io.read(io.StringIO(data.structure_xyz(d)), format="xyz")
    np.testing.assert_allclose(atoms.positions, d["positions"], atol=1e-6)
    assert atoms.get_chemical_formula() == "H2O"
    fig = plots.structure_figure(d, d["labels"][0]["forces"])
    bonds, atoms_trace = fig.data
    assert len(atoms_trace.x) == 3
    assert len(bonds.x) == 2 * 3  # two O-H bonds, no H-H bond (segments end with None)


def test_prefect_run_url():
    rid = "5f0c5b0e-0000-0000-0000-000000000000"
    assert data.prefect_run_url(rid, "http://127.0.0.1:4200/api") == (
        f"http://127.0.0.1:4200/runs/flow-run/{rid}")
    assert data.prefect_run_url(rid, None, "https://prefect.example.org/") == (
        f"https://prefect.example.org/runs/flow-run/{rid}")
    assert data.prefect_run_url(rid, None) is None
    assert data.prefect_run_url(None, "http://127.0.0.1:4200/api") is None


def test_dashboard_engine_cannot_write(demo):
    from sqlalchemy import insert, text
    from sqlalchemy.exc import DBAPIError

    from bayesal.db import Campaign, session_scope

    ro, _ = demo
    with pytest.raises(DBAPIError, match=r"(?i)read.?only|readonly|query_only"), \
            session_scope(ro) as session:
        session.execute(insert(Campaign).values(name="sneaky", config={}))
    with pytest.raises(DBAPIError), ro.connect() as conn:
        conn.execute(text("DELETE FROM labels"))
        conn.commit()
    assert data.campaign_names(ro) == ["demo", "fresh"]
    assert len(data.labels_frame(ro, "demo")) == 13


def test_cli_refuses_a_missing_database(tmp_path, monkeypatch):
    from bayesal.cli import app

    monkeypatch.setenv("BAYESAL_DATABASE_URL", f"sqlite:///{tmp_path / 'none.db'}")
    result = CliRunner().invoke(app, ["dashboard"])
    assert result.exit_code == 1
    assert "does not exist" in result.output and "bayesal db upgrade" in result.output
    assert not (tmp_path / "none.db").exists()


def test_streamlit_command_is_headless_and_local():
    from bayesal.cli.dashboard import APP, _is_loopback, streamlit_command

    cmd = streamlit_command("127.0.0.1", 8502, "demo", 10.0)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(APP) and APP.is_file()
    opts = dict(zip(cmd[5:cmd.index("--"):2], cmd[6:cmd.index("--"):2], strict=True))
    assert opts["--server.address"] == "127.0.0.1" and opts["--server.port"] == "8502"
    assert opts["--server.headless"] == "true"
    assert opts["--browser.gatherUsageStats"] == "false"
    assert cmd[cmd.index("--") + 1:] == ["--refresh", "10.0", "--campaign", "demo"]
    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("10.1.2.3")


def test_reads_do_not_wait_for_a_running_writer(demo, engine):
    """A campaign writing (open transaction) neither blocks the dashboard nor is blocked by it;
    the dashboard sees the new round once it is committed."""
    import time

    from sqlalchemy import insert, select

    from bayesal.db import Campaign, Round, session_scope

    ro, _ = demo
    with session_scope(engine) as writer:  # BEGIN IMMEDIATE on SQLite: holds the write lock
        cid = writer.scalar(select(Campaign.id).where(Campaign.name == "demo"))
        writer.execute(insert(Round).values(campaign_id=cid, round_index=3, status="running",
                                            metrics={}, n_labelled=0))
        t0 = time.perf_counter()
        ov = data.overview(ro, "demo")
        assert time.perf_counter() - t0 < 5  # busy_timeout is 30 s: it did not wait
        assert (ov.n_rounds, ov.state) == (3, "idle")  # uncommitted round not visible
    ov = data.overview(ro, "demo")
    assert (ov.n_rounds, ov.state, ov.running_round) == (4, "running", 3)
