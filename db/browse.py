"""Read-only queries that browse one campaign (the dashboard's data; no pandas here).

Every function takes an engine (the dashboard's is read-only, see :func:`db.make_engine`)
and opens one short read transaction, so a running campaign writing to the same database
is never blocked. Units are the database's: eV, eV/Å, seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, select

from bayesal.db.ingest import run_transaction
from bayesal.db.models import Campaign, Label, LabelStatus, Round, RoundStatus, Score, Structure
from bayesal.db.queries import labels_by_status, structures_by_source

__all__ = [
    "LABEL_COLUMNS",
    "LabelFilters",
    "Overview",
    "UnknownCampaign",
    "campaign_names",
    "check_campaign",
    "label_filters",
    "label_rows",
    "overview",
    "score_rows",
    "scored_rounds",
    "structure_detail",
]


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


def check_campaign(engine: Engine, campaign: str) -> None:
    """Raise :class:`UnknownCampaign` (naming the existing ones) unless ``campaign`` exists."""
    run_transaction(engine, lambda s: _campaign(s, campaign))


def scored_rounds(engine: Engine, campaign: str) -> list[int]:
    """Indices of the rounds that stored acquisition scores."""

    def work(session) -> list[int]:
        camp = _campaign(session, campaign)
        return list(session.scalars(
            select(Round.round_index).where(Round.campaign_id == camp.id)
            .where(select(Score.id).where(Score.round_id == Round.id).exists())
            .order_by(Round.round_index)))

    return run_transaction(engine, work)


def score_rows(engine: Engine, campaign: str, round_index: int) -> list[dict[str, Any]]:
    """Every candidate scored in one round, best first: score, selected, rank, source and
    the components (bald_e, bald_f, energy_std, max_force_std, ...) as keys."""

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

    return run_transaction(engine, work)


LABEL_COLUMNS = ["label_id", "structure_id", "formula", "n_atoms", "source", "round",
                  "status", "energy (eV)", "energy/atom (eV)", "max |F| (eV/Å)", "scf cycles",
                  "wall s", "error", "labeler", "method", "basis", "created"]


def label_rows(engine: Engine, campaign: str, *, status: list[str] | None = None,
               source: list[str] | None = None, rounds: list[int] | None = None,
               formula: str | None = None, limit: int | None = None) -> list[tuple]:
    """Labels of a campaign's structures (tuples in :data:`LABEL_COLUMNS` order), newest
    first, with optional filters; ``round`` is the round that requested the label (None:
    initial/test/imported labels)."""

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

    return run_transaction(engine, work)


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
