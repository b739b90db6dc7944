"""The bayesal dashboard (a Streamlit script): ``bayesal dashboard`` starts it.

It reads the campaign database named by ``BAYESAL_DATABASE_URL`` through a read-only engine
(every write is refused by the database itself) in short transactions, and reruns every
``--refresh`` seconds so that a running campaign can be watched. Script arguments (after
Streamlit's ``--``): ``--campaign NAME --refresh SECONDS``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pandas as pd
import streamlit as st
from sqlalchemy.exc import OperationalError

from bayesal.contracts import LabelStatus
from bayesal.dashboard import data, plots
from bayesal.dashboard.data import md
from bayesal.db import DatabaseError, ensure_schema, readonly_engine

FAILED = [s.value for s in LabelStatus if s != LabelStatus.OK]


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bayesal dashboard")
    p.add_argument("--campaign", default=None)
    p.add_argument("--refresh", type=float, default=30.0)
    return p.parse_known_args(sys.argv[1:])[0]


@st.cache_resource
def _engine(url: str):
    engine = readonly_engine(url)
    ensure_schema(engine)  # a missing/old schema raises SchemaOutOfDate naming the fix
    return engine


def _cell(value, digits: int) -> object:
    """One table cell for display: floats with ``digits`` decimals (trailing zeros dropped,
    scientific when tiny or huge), times to the second, missing values blank."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NaT:
        return ""
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".")
    if hasattr(value, "strftime"):
        return f"{value:%Y-%m-%d %H:%M:%S}"
    return value


def _fmt(df: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """A frame rendered as display strings (st.table shows them as they are)."""
    return df.astype(object).map(lambda v: _cell(v, digits))


def overview_tab(view: data.CampaignView) -> None:
    ov = view(data.overview)
    state = {"new": "no round yet", "running": f"round {ov.running_round} running",
             "idle": "no round running"}[ov.state]
    st.subheader(f"Campaign {md(ov.name)}")
    st.caption(f"created {ov.created_at:%Y-%m-%d %H:%M} · {state}")
    cols = st.columns(5)
    cols[0].metric("completed rounds", ov.n_completed)
    cols[1].metric("ok labels", ov.n_ok)
    cols[2].metric("failed labels", ov.n_failed)
    cols[3].metric("structures", sum(ov.structures.values()))
    last = ov.last_round.get("metrics", {})
    mae = last.get("test_force_mae")
    cols[4].metric("latest test F MAE (meV/Å)", f"{1000 * mae:.1f}" if mae else "–")
    if ov.label_budget:
        used = min(1.0, ov.labels_requested / ov.label_budget)
        st.progress(used, text=f"label budget: {ov.labels_requested} of {ov.label_budget} "
                               "used by rounds (failed labels count)")
    st.caption("structures by source: " + (", ".join(
        f"{md(k)} {v}" for k, v in sorted(ov.structures.items())) or "none"))
    url = data.prefect_run_url(last.get("flow_run_id"), os.environ.get("PREFECT_API_URL"),
                               os.environ.get("PREFECT_UI_URL"))
    if url:
        st.markdown(f"Prefect flow run of round {ov.last_round['round']}: [{url}]({url})")
    elif ov.n_rounds:
        st.caption("Set PREFECT_API_URL (or PREFECT_UI_URL) to link rounds to Prefect runs.")
    if ov.n_rounds == 0:
        st.info(f"No rounds yet. The campaign has {sum(ov.structures.values())} structures "
                f"and {ov.n_ok} ok labels; rounds appear here once `bayesal run CONFIG` "
                "has trained its first model.")
        return
    st.markdown("#### Rounds")
    st.table(_fmt(view(data.rounds_frame).drop(columns=["started"])), hide_index=True)


def curves_tab(view: data.CampaignView) -> None:
    curves = view(data.learning_curves)
    if curves.empty:
        st.info("No evaluated round yet: learning curves need a completed round with test "
                "files (data.test_files in the campaign YAML).")
        return
    metrics = [m for m, _ in data.CURVE_METRICS.values() if m in set(curves["metric"])]
    metric = st.radio("metric", metrics, horizontal=True, key="curve_metric")
    st.plotly_chart(view.memo(("curve", metric),
                              lambda: plots.learning_curve_figure(curves, metric), ("rounds",)),
                    key="learning_curve")
    wide = curves.pivot_table(index=["round", "labels"], columns=["metric", "test_set"],
                              values="value")
    wide.columns = [f"{m} [{t}]" for m, t in wide.columns]
    st.dataframe(wide.reset_index(), hide_index=True)


def calibration_tab(view: data.CampaignView) -> None:
    cal = view(data.calibration_frame)
    if cal.empty:
        st.info("No evaluated round yet: calibration needs a completed round with test files.")
        return
    left, right = st.columns(2)
    with left:
        rel = view(data.reliability_frame)
        if rel.empty:
            st.info("These rounds stored no reliability curves (evaluated before they were "
                    "recorded); the table shows their calibration metrics.")
        else:
            quantity = st.radio("quantity", sorted(rel["quantity"].unique(), reverse=True),
                                horizontal=True, key="rel_quantity")
            variant = st.radio("variances", sorted(rel["variant"].unique(), reverse=True),
                               horizontal=True, key="rel_variant")
            st.plotly_chart(view.memo(("reliability", quantity, variant),
                                      lambda: plots.reliability_figure(rel, quantity, variant),
                                      ("rounds",)),
                            key="reliability")
    with right:
        long = cal.melt(id_vars=["round", "labels"],
                        value_vars=["force_miscal_area", "force_miscal_area_recal",
                                    "energy_miscal_area", "energy_miscal_area_recal",
                                    "force_spearman", "energy_spearman"],
                        var_name="metric", value_name="value").dropna()
        long["test_set"] = long["metric"].map(
            lambda m: m.split("_")[0] + (" (recalibrated)" if m.endswith("_recal") else ""))
        long["metric"] = long["metric"].map(
            lambda m: "Spearman ρ(|error|, σ)" if "spearman" in m else "miscalibration area")
        for metric in ("miscalibration area", "Spearman ρ(|error|, σ)"):
            st.plotly_chart(view.memo(("calibration", metric),
                                      lambda m=metric: plots.learning_curve_figure(long, m),
                                      ("rounds",)),
                            key=f"cal_{metric}")
    st.dataframe(cal, hide_index=True)


def acquisition_tab(view: data.CampaignView) -> None:
    rounds = view(data.scored_rounds)
    if not rounds:
        st.info("No scores yet: a round stores every candidate's score when it selects.")
        return
    r = st.selectbox("round", rounds, index=len(rounds) - 1, key="acq_round")
    agg = view(data.score_overview, r)
    scores = view(data.score_sample_frame, r)
    numeric = [c for c in scores.columns
               if c not in ("structure_id", "acquisition", "selected", "rank", "source")
               and pd.api.types.is_numeric_dtype(scores[c])]
    column = st.radio("quantity", numeric, horizontal=True, key="acq_column")
    cols = st.columns(4)
    cols[0].metric("scored", f"{agg.n:,}")
    cols[1].metric("selected", f"{agg.n_selected:,}")
    cols[2].metric("mean score (pool)", "–" if agg.mean is None else f"{agg.mean:.3g}")
    cols[3].metric("mean score (selected)",
                   "–" if agg.mean_selected is None else f"{agg.mean_selected:.3g}")
    st.plotly_chart(view.memo(("scores", r, column),
                              lambda: plots.score_figure(scores, column, total=agg.n),
                              ("scores", "rounds")),
                    key="scores")
    if agg.n > len(scores):
        st.caption(f"The histogram shows {len(scores):,} of the round's {agg.n:,} candidates: "
                   "the selected batch and an evenly spread sample of the rest. The counts "
                   "and means above are over all of them.")
    st.markdown("#### Selected batch")
    st.dataframe(scores[scores["selected"]].sort_values("rank"), hide_index=True)


def labeling_tab(view: data.CampaignView) -> None:
    stats = data.labeling_by_round(view(data.overview))
    if stats.empty:
        st.info("No labels yet.")
        return
    st.table(_fmt(stats), hide_index=True)
    total = int(stats["labels"].sum())
    recent = view(data.labels_timeline)
    st.plotly_chart(view.memo(("labeling",),
                              lambda: plots.labeling_figure(recent, total=total), ("labels",)),
                    key="labeling")
    n_failed = int(stats["failed"].sum())
    if n_failed:
        st.markdown("#### Failed labels")
        failed = view(data.labels_frame, status=FAILED, limit=data.PAGE_ROWS)
        if n_failed > len(failed):
            st.caption(f"the newest {len(failed):,} of {n_failed:,} (all of them: the "
                       "`label_failures` view of `bayesal sql`)")
        st.dataframe(failed[["structure_id", "round", "status", "error", "wall s", "created"]],
                     hide_index=True)


def data_tab(view: data.CampaignView) -> None:
    ov = view(data.overview)
    offer = data.label_filters(ov)
    if not offer.total:
        st.info("No labelled data yet.")
        return
    c = st.columns(4)
    status = c[0].multiselect("status", offer.status, key="f_status")
    source = c[1].multiselect("source", offer.source, key="f_source")
    rounds = c[2].multiselect("round", offer.rounds, key="f_round")
    formula = c[3].selectbox("formula", ["(any)", *offer.formula], key="f_formula")
    filters = {"status": status or None, "source": source or None,
               "rounds": [int(r) for r in rounds] or None,
               "formula": None if formula == "(any)" else formula}
    n = (ov.count_labels(filters["status"], filters["rounds"])
         if filters["formula"] is None and filters["source"] is None
         else view(data.label_count, **filters))
    pages = max(1, -(-n // data.PAGE_ROWS))
    page = int(st.number_input(f"page (of {pages:,})", min_value=1, max_value=pages, value=1,
                               step=1, key="f_page"))
    first = (page - 1) * data.PAGE_ROWS
    df = view(data.labels_frame, limit=data.PAGE_ROWS, offset=first, **filters)
    st.caption(f"labels {first + 1:,}-{first + len(df):,} of {n:,} matching "
               f"({offer.total:,} in the campaign), newest first")
    st.dataframe(df, hide_index=True)
    engine, name = view.engine, view.campaign
    label = ("Download CSV" if n <= data.CSV_ROWS else
             f"Download CSV (the newest {data.CSV_ROWS:,}; all: `bayesal sql --csv`)")
    st.download_button(label, lambda: data.labels_csv(engine, name, **filters),
                       file_name=f"{name}-labels.csv", mime="text/csv")


def structure_tab(view: data.CampaignView) -> None:
    engine, name = view.engine, view.campaign
    labels = view(data.labels_frame, limit=1)
    default = int(labels["structure_id"].iloc[0]) if len(labels) else 1
    sid = st.number_input("structure id", min_value=1, value=default, step=1, key="sid")
    try:
        detail = data.structure_detail(engine, name, int(sid))
    except KeyError as exc:
        st.warning(md(exc.args[0]))
        return
    ok = [lab for lab in detail["labels"] if lab["status"] == "ok"]
    left, right = st.columns([2, 1])
    with left:
        forces = ok[0]["forces"] if ok else None
        st.plotly_chart(view.memo(("structure", detail["id"]),
                                  lambda: plots.structure_figure(detail, forces), ("labels",)),
                        key="structure")
    with right:
        st.markdown(f"**{md(detail['formula'])}**, {detail['n_atoms']} atoms, source "
                    f"{md(detail['source'])}" + (f", explored from structure {detail['parent_id']}"
                                               if detail["parent_id"] else ""))
        for lab in detail["labels"]:
            text = (f"{md(lab['labeler'])} {md(lab['method'] or '')}/"
                    f"{md(lab['basis'] or '')}: **{md(lab['status'])}**")
            if lab["status"] == "ok":
                text += f", E = {lab['energy']:.4f} eV, max |F| = {lab['max_force']:.3f} eV/Å"
            elif lab["error"]:
                text += f" ({md(lab['error'])})"
            st.markdown("- " + text)
        if not detail["labels"]:
            st.markdown("- not labelled")
        score = detail["score"]
        if score is None:
            st.caption("never scored (initial/test structures are not candidates)")
        else:
            chosen = "selected" if score["selected"] else "not selected"
            st.markdown(f"**Predicted uncertainty** (round {score['round']}, "
                        f"{md(score['acquisition'])}, {chosen})")
            st.table(pd.DataFrame({"value": {k: v for k, v in score.items()
                                             if isinstance(v, float)}}))
        st.download_button("Download XYZ", data.structure_xyz(detail),
                           file_name=f"structure-{detail['id']}.xyz")


TABS = {"Overview": overview_tab, "Learning curves": curves_tab,
        "Calibration": calibration_tab, "Acquisition": acquisition_tab,
        "Labeling": labeling_tab, "Data": data_tab, "Structure": structure_tab}


def main() -> None:
    args = _args()
    st.set_page_config(page_title="bayesal", page_icon="⚛", layout="wide")
    url = os.environ.get("BAYESAL_DATABASE_URL", "sqlite:///bayesal.db")
    try:
        engine = _engine(url)
        names = data.campaign_names(engine)
    except (DatabaseError, OperationalError) as exc:
        st.error(f"Cannot read the campaign database: {md(exc)}")
        st.stop()
    st.sidebar.title("bayesal")
    if not names:
        st.info("No campaigns in this database yet. Start one with `bayesal run CONFIG.yaml` "
                "(or `./examples/quickstart.sh`); it appears here when it starts.")
        st.stop()
    wanted = args.campaign
    if wanted is not None and wanted not in names:
        st.error(f"No campaign named {md(repr(wanted))}. Existing campaigns: "
                 f"{md(', '.join(names))}.")
    default = names.index(wanted) if wanted in names else len(names) - 1
    name = st.sidebar.selectbox("campaign", names, index=default, key="campaign")
    refresh = st.sidebar.number_input("refresh every (s, 0 = off)", min_value=0.0,
                                      value=float(args.refresh), step=5.0, key="refresh")
    st.sidebar.caption(f"database: {md(_masked(url))}")

    def body() -> None:
        try:
            view = data.CampaignView(engine, name)
        except data.UnknownCampaign as exc:
            st.error(md(exc))
            return
        except OperationalError as exc:
            st.error(f"database error (retrying at the next refresh): {md(exc.orig)}")
            return
        for tab, render in zip(st.tabs(list(TABS)), TABS.values(), strict=True):
            with tab:
                try:
                    render(view)
                except data.UnknownCampaign as exc:
                    st.error(md(exc))
                except OperationalError as exc:
                    st.error(f"database error (retrying at the next refresh): {md(exc.orig)}")

    st.fragment(body, run_every=refresh or None)()


def _masked(url: str) -> str:
    from bayesal.db.engine import redact_url

    return redact_url(url)


main()
