"""What the dashboard shows, read from a campaign database (no Streamlit here, no Prefect).

Every function takes an engine (the dashboard's is read-only, see
:func:`db.readonly_engine`) and opens one short read transaction, so a running campaign
writing to the same database is never blocked. Frames use display units: meV and meV/Å
for errors, seconds for durations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Engine, func, select

from bayesal.contracts import RoundMetric as M
from bayesal.contracts import metric_on_test, split_metric_on_test
from bayesal.db.ingest import run_transaction
from bayesal.db.models import Campaign, Label, LabelStatus, Round, RoundStatus, Score, Structure
from bayesal.db.queries import labels_by_status, structures_by_source
from bayesal.db.rounds import round_history

__all__ = [
    "CURVE_METRICS",
    "LabelFilters",
    "Overview",
    "UnknownCampaign",
    "calibration_frame",
    "campaign_names",
    "label_filters",
    "labeling_by_round",
    "labels_frame",
    "learning_curves",
    "overview",
    "prefect_run_url",
    "reliability_frame",
    "rounds_frame",
    "scored_rounds",
    "scores_frame",
    "structure_detail",
    "structure_xyz",
]

# metric suffix -> (display name, factor to display units)
CURVE_METRICS = {
    "force_mae": ("force MAE (meV/Å)", 1000.0),
    "energy_mae": ("energy MAE (meV)", 1000.0),
    "force_rmse": ("force RMSE (meV/Å)", 1000.0),
    "force_nll": ("force NLL (nats)", 1.0),
    "energy_nll": ("energy NLL (nats)", 1.0),
}
_REL_KEY = re.compile(r"^test_(?P<q>energy|force)_reliability_p(?P<p>\d\d)(?P<recal>_recal)?$")


class UnknownCampaign(LookupError):
    """No campaign of that name; the message lists the existing ones."""


@dataclass
class Overview:
    name: str
    created_at: datetime
    config: dict[str, Any]
    structures: dict[str, int]  # by source
    labels: dict[str, int]  # by status (campaign labeler and imported labels alike)
    n_rounds: int = 0
    n_completed: int = 0
    running_round: int | None = None
    last_round: dict[str, Any] = field(default_factory=dict)  # index, status, times, metrics
    label_budget: int | None = None
    labels_requested: int = 0  # labels made by rounds (ok + failed): what the budget counts

    @property
    def n_ok(self) -> int:
        return self.labels.get(LabelStatus.OK.value, 0)

    @property
    def n_failed(self) -> int:
        return sum(v for k, v in self.labels.items() if k != LabelStatus.OK.value)

    @property
    def state(self) -> str:
        """``new`` (no round yet), ``running`` (a round is open) or ``idle``."""
        if self.n_rounds == 0:
            return "new"
        return "running" if self.running_round is not None else "idle"


def campaign_names(engine: Engine) -> list[str]:
    """Every campaign, oldest first."""
    return run_transaction(engine, lambda s: list(s.scalars(
        select(Campaign.name).order_by(Campaign.created_at, Campaign.id))))


def _campaign(session, name: str) -> Campaign:
    camp = session.scalars(select(Campaign).where(Campaign.name == name)).first()
    if camp is None:
        names = list(session.scalars(select(Campaign.name).order_by(Campaign.name)))
        existing = ", ".join(names) if names else "none yet"
        raise UnknownCampaign(f"no campaign named {name!r}; existing campaigns: {existing}")
    return camp


def _rounds(session, campaign_id: int) -> list[Round]:
    return list(session.scalars(select(Round).where(Round.campaign_id == campaign_id)
                                .order_by(Round.round_index)))


def overview(engine: Engine, campaign: str) -> Overview:
    """Counts, budget and the state of the latest round of ``campaign``."""

    def work(session) -> Overview:
        camp = _campaign(session, campaign)
        by_source = structures_by_source(session, camp.id).get(camp.id, {})
        by_status = labels_by_status(session, camp.id).get(camp.id, {})
        requested = session.scalar(
            select(func.count()).select_from(Label).join(Round, Round.id == Label.round_id)
            .where(Round.campaign_id == camp.id)) or 0
        rounds = _rounds(session, camp.id)
        config = dict(camp.config or {})
        out = Overview(name=camp.name, created_at=camp.created_at, config=config,
                       structures=by_source, labels=by_status, n_rounds=len(rounds),
                       labels_requested=int(requested),
                       label_budget=(config.get("stop") or {}).get("label_budget"))
        out.n_completed = sum(r.status == RoundStatus.COMPLETED.value for r in rounds)
        running = [r.round_index for r in rounds if r.status == RoundStatus.RUNNING.value]
        out.running_round = running[0] if running else None
        if rounds:
            last = rounds[-1]
            out.last_round = {"round": last.round_index, "status": last.status,
                              "started_at": last.started_at, "finished_at": last.finished_at,
                              "metrics": dict(last.metrics or {})}
        return out

    return run_transaction(engine, work)


def _history(engine: Engine, campaign: str) -> list[dict[str, Any]]:
    """:func:`db.rounds.round_history`, with an unknown campaign named as such."""
    rows = round_history(engine, campaign)
    if not rows:
        run_transaction(engine, lambda s: _campaign(s, campaign))  # raises if unknown
    return rows


def _milli(value: Any) -> float:
    return 1000.0 * value if isinstance(value, int | float) else np.nan


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else np.nan


def rounds_frame(engine: Engine, campaign: str) -> pd.DataFrame:
    """One row per round: labels, failures, test errors, calibration, batch scores, times."""
    rows = []
    for r in _history(engine, campaign):
        m = r["metrics"]
        rows.append({
            "round": r["round"], "status": r["status"],
            "training labels": m.get(M.N_TRAIN_LABELS),
            "new ok labels": m.get(M.N_OK, r["n_labelled"]),
            "failed labels": m.get(M.N_FAILED),
            "test F MAE (meV/Å)": _milli(m.get(M.TEST_FORCE_MAE)),
            "test E MAE (meV)": _milli(m.get(M.TEST_ENERGY_MAE)),
            "test F NLL": _num(m.get(M.TEST_FORCE_NLL)),
            "F miscal. area": _num(m.get(M.TEST_FORCE_MISCAL)),
            "selected mean score": _num(m.get(M.SELECTED_SCORE_MEAN)),
            "selected max score": _num(m.get(M.SELECTED_SCORE_MAX)),
            "train s": _num(m.get(M.TRAIN_S)), "score s": _num(m.get(M.SCORE_S)),
            "label s": _num(m.get(M.LABEL_S)), "round s": _num(m.get(M.ROUND_S)),
            "started": r["started_at"], "finished": r["finished_at"],
        })
    return pd.DataFrame(rows)


def _test_sets(metrics: dict[str, Any]) -> list[str]:
    """``all`` plus the per-file test sets present in a round's metrics."""
    names = []
    for key in metrics:
        found, name = split_metric_on_test(key, "force_mae")
        if found:
            names.append(name or "all")
    return sorted(names, key=lambda n: (n != "all", n))


def learning_curves(engine: Engine, campaign: str) -> pd.DataFrame:
    """Long frame (round, labels, test_set, metric, value) of completed rounds; ``labels``
    is the number of labels the round's model was trained on."""
    rows = []
    for r in _history(engine, campaign):
        m = r["metrics"]
        if r["status"] != RoundStatus.COMPLETED.value or M.N_TRAIN_LABELS not in m:
            continue
        for test_set in _test_sets(m):
            for metric, (label, factor) in CURVE_METRICS.items():
                value = m.get(metric_on_test(metric, None if test_set == "all" else test_set))
                if isinstance(value, int | float):
                    rows.append({"round": r["round"], "labels": m[M.N_TRAIN_LABELS],
                                 "test_set": test_set, "metric": label,
                                 "value": factor * value})
    return pd.DataFrame(rows, columns=["round", "labels", "test_set", "metric", "value"])


def calibration_frame(engine: Engine, campaign: str) -> pd.DataFrame:
    """Per completed round: miscalibration area, Spearman ρ(|error|, σ), ENCE and coverage of
    the whole test set, before and after the validation-fitted recalibration."""
    keys = ("miscal_area", "miscal_area_recal", "spearman", "ence", "ence_recal",
            "coverage68", "coverage68_recal", "coverage95", "coverage95_recal")
    rows = []
    for r in _history(engine, campaign):
        m = r["metrics"]
        if r["status"] != RoundStatus.COMPLETED.value or M.TEST_FORCE_MAE not in m:
            continue
        row: dict[str, Any] = {"round": r["round"], "labels": m.get(M.N_TRAIN_LABELS)}
        for quantity in ("energy", "force"):
            for k in keys:
                row[f"{quantity}_{k}"] = _num(m.get(metric_on_test(f"{quantity}_{k}")))
        rows.append(row)
    return pd.DataFrame(rows)


def reliability_frame(engine: Engine, campaign: str) -> pd.DataFrame:
    """Reliability curves (expected vs observed P(u ≤ p) of the PIT values) per completed
    round, quantity (energy/force) and variant (raw/recalibrated), with (0,0) and (1,1)."""
    rows = []
    for r in _history(engine, campaign):
        points: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for key, value in r["metrics"].items():
            if (m := _REL_KEY.match(key)) is not None and isinstance(value, int | float):
                variant = "recalibrated" if m.group("recal") else "raw"
                points.setdefault((m.group("q"), variant), []).append(
                    (int(m.group("p")) / 100, float(value)))
        for (quantity, variant), pts in sorted(points.items()):
            for expected, observed in [(0.0, 0.0), *sorted(pts), (1.0, 1.0)]:
                rows.append({"round": r["round"], "quantity": quantity, "variant": variant,
                             "expected": expected, "observed": observed})
    return pd.DataFrame(rows, columns=["round", "quantity", "variant", "expected", "observed"])


def scored_rounds(engine: Engine, campaign: str) -> list[int]:
    """Indices of the rounds that stored acquisition scores."""

    def work(session) -> list[int]:
        camp = _campaign(session, campaign)
        return list(session.scalars(
            select(Round.round_index).where(Round.campaign_id == camp.id)
            .where(select(Score.id).where(Score.round_id == Round.id).exists())
            .order_by(Round.round_index)))

    return run_transaction(engine, work)


def scores_frame(engine: Engine, campaign: str, round_index: int) -> pd.DataFrame:
    """Every candidate scored in one round: score, selected, rank and the components
    (bald_e, bald_f, energy_std, max_force_std, ...) as columns."""

    def work(session) -> list[dict[str, Any]]:
        camp = _campaign(session, campaign)
        q = (select(Score.structure_id, Score.acquisition, Score.score, Score.selected,
                    Score.rank, Score.components, Structure.source)
             .join(Round, Round.id == Score.round_id)
             .join(Structure, Structure.id == Score.structure_id)
             .where(Round.campaign_id == camp.id, Round.round_index == round_index)
             .order_by(Score.score.desc()))
        return [{"structure_id": sid, "acquisition": acq, "score": score,
                 "selected": bool(sel), "rank": rank, "source": source, **(comp or {})}
                for sid, acq, score, sel, rank, comp, source in session.execute(q)]

    rows = run_transaction(engine, work)
    base = ["structure_id", "acquisition", "score", "selected", "rank", "source"]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=base)


_LABEL_COLUMNS = ["label_id", "structure_id", "formula", "n_atoms", "source", "round",
                  "status", "energy (eV)", "energy/atom (eV)", "max |F| (eV/Å)", "scf cycles",
                  "wall s", "error", "labeler", "method", "basis", "created"]


def labels_frame(engine: Engine, campaign: str, *, status: list[str] | None = None,
                 source: list[str] | None = None, rounds: list[int] | None = None,
                 formula: str | None = None, limit: int | None = None) -> pd.DataFrame:
    """Labels of a campaign's structures, newest first, with optional filters; ``round`` is
    the round that requested the label (NaN: initial/test/imported labels)."""

    def work(session) -> list[tuple]:
        camp = _campaign(session, campaign)
        q = (select(Label.id, Label.structure_id, Structure.formula, Structure.n_atoms,
                    Structure.source, Round.round_index, Label.status, Label.energy,
                    Label.energy_per_atom, Label.max_force, Label.n_scf_cycles, Label.wall_s,
                    Label.error, Label.labeler, Label.method, Label.basis, Label.created_at)
             .join(Structure, Structure.id == Label.structure_id)
             .outerjoin(Round, Round.id == Label.round_id)
             .where(Structure.campaign_id == camp.id)
             .order_by(Label.created_at.desc(), Label.id.desc()))
        if status:
            q = q.where(Label.status.in_(status))
        if source:
            q = q.where(Structure.source.in_(source))
        if rounds:
            q = q.where(Round.round_index.in_(rounds))
        if formula:
            q = q.where(Structure.formula == formula)
        if limit:
            q = q.limit(limit)
        return [tuple(r) for r in session.execute(q)]

    return pd.DataFrame(run_transaction(engine, work), columns=_LABEL_COLUMNS)


@dataclass(frozen=True)
class LabelFilters:
    """What the Data tab's filters offer: the distinct values among a campaign's labels."""

    total: int
    status: list[str]
    source: list[str]
    rounds: list[int]
    formula: list[str]


def label_filters(engine: Engine, campaign: str) -> LabelFilters:
    """Distinct status/source/round/formula values of a campaign's labels and their count,
    by DISTINCT queries (the labels themselves are not read)."""

    def work(session) -> LabelFilters:
        camp = _campaign(session, campaign)
        by_status = labels_by_status(session, camp.id).get(camp.id, {})

        def distinct(column, join_round: bool = False) -> list:
            q = (select(column).distinct().select_from(Label)
                 .join(Structure, Structure.id == Label.structure_id)
                 .where(Structure.campaign_id == camp.id))
            if join_round:  # labels requested by a round (not initial/test/imported)
                q = q.join(Round, Round.id == Label.round_id)
            return sorted(session.scalars(q))

        return LabelFilters(
            total=sum(by_status.values()), status=sorted(by_status),
            source=distinct(Structure.source),
            rounds=distinct(Round.round_index, join_round=True),
            formula=distinct(Structure.formula))

    return run_transaction(engine, work)


def labeling_by_round(labels: pd.DataFrame) -> pd.DataFrame:
    """Per round (``setup`` for labels no round requested): labels, ok, failed, failure
    reasons, mean/max seconds and median SCF cycles."""
    if labels.empty:
        return pd.DataFrame(columns=["round", "labels", "ok", "failed", "failures",
                                     "mean wall s", "max wall s", "median scf cycles"])
    df = labels.assign(round=labels["round"].map(
        lambda r: "setup" if pd.isna(r) else str(int(r))))
    rows = []
    for name, g in df.groupby("round", sort=False):
        failed = g[g["status"] != LabelStatus.OK.value]
        reasons = failed["status"].value_counts().to_dict()
        rows.append({"round": name, "labels": len(g),
                     "ok": int((g["status"] == LabelStatus.OK.value).sum()),
                     "failed": len(failed),
                     "failures": ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())),
                     "mean wall s": g["wall s"].mean(), "max wall s": g["wall s"].max(),
                     "median scf cycles": g["scf cycles"].median()})
    out = pd.DataFrame(rows)
    order = out["round"].map(lambda r: -1 if r == "setup" else int(r))
    return out.iloc[np.argsort(order.to_numpy(), kind="stable")].reset_index(drop=True)


def structure_detail(engine: Engine, campaign: str, structure_id: int) -> dict[str, Any]:
    """Geometry, labels and the latest acquisition scores (predicted uncertainty) of one
    structure of ``campaign``; raises KeyError when it is not in the campaign."""

    def work(session) -> dict[str, Any]:
        camp = _campaign(session, campaign)
        s = session.get(Structure, structure_id)
        if s is None or s.campaign_id != camp.id:
            raise KeyError(f"structure {structure_id} is not in campaign {campaign!r}")
        labels = [{"status": lab.status, "labeler": lab.labeler, "method": lab.method,
                   "basis": lab.basis, "energy": lab.energy, "max_force": lab.max_force,
                   "forces": lab.forces, "error": lab.error, "wall_s": lab.wall_s,
                   "n_scf_cycles": lab.n_scf_cycles}
                  for lab in session.scalars(select(Label).where(Label.structure_id == s.id)
                                             .order_by(Label.created_at))]
        score = session.execute(
            select(Round.round_index, Score.acquisition, Score.score, Score.selected,
                   Score.components)
            .join(Round, Round.id == Score.round_id).where(Score.structure_id == s.id)
            .order_by(Round.round_index.desc())).first()
        return {"id": s.id, "formula": s.formula, "source": s.source, "n_atoms": s.n_atoms,
                "numbers": np.asarray(s.numbers), "positions": np.asarray(s.positions),
                "cell": np.asarray(s.cell), "pbc": s.pbc, "parent_id": s.parent_id,
                "labels": labels,
                "score": None if score is None else {
                    "round": score[0], "acquisition": score[1], "score": score[2],
                    "selected": bool(score[3]), **(score[4] or {})}}

    return run_transaction(engine, work)


def structure_xyz(detail: dict[str, Any]) -> str:
    """The structure as XYZ text (for download or a molecule viewer)."""
    from ase.data import chemical_symbols

    lines = [str(detail["n_atoms"]), f"structure {detail['id']} {detail['formula']}"]
    for z, (x, y, zc) in zip(detail["numbers"], detail["positions"], strict=True):
        lines.append(f"{chemical_symbols[int(z)]:2s} {x:12.6f} {y:12.6f} {zc:12.6f}")
    return "\n".join(lines) + "\n"


def prefect_run_url(flow_run_id: str | None, api_url: str | None,
                    ui_url: str | None = None) -> str | None:
    """Link to a flow run in the Prefect UI when a Prefect API (or UI) URL is configured."""
    if not flow_run_id or not (ui_url or api_url):
        return None
    base = (ui_url or re.sub(r"/api/?$", "", api_url or "")).rstrip("/")
    return f"{base}/runs/flow-run/{flow_run_id}"
