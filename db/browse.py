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
from sqlalchemy import Engine, case, func, select

from bayesal.db.ingest import run_transaction
from bayesal.db.models import Campaign, Label, LabelStatus, Round, RoundStatus, Score, Structure

__all__ = [
    "LABEL_COLUMNS",
    "LabelFilters",
    "LabelGroup",
    "Overview",
    "ScoreOverview",
    "UnknownCampaign",
    "campaign_names",
    "campaign_version",
    "check_campaign",
    "label_count",
    "label_filters",
    "label_rows",
    "label_timeline",
    "overview",
    "score_overview",
    "score_rows",
    "score_sample",
    "scored_rounds",
    "structure_detail",
]


class UnknownCampaign(LookupError):
    """No campaign of that name; the message lists the existing ones."""


@dataclass(frozen=True)
class LabelGroup:
    """A campaign's labels of one (requesting round, status): how many, and the sums behind
    mean/max seconds and mean SCF cycles. ``round`` is None for labels no round requested
    (initial, test, imported)."""

    round: int | None
    status: str
    n: int
    wall_sum: float = 0.0
    wall_n: int = 0
    wall_max: float | None = None
    scf_sum: float = 0.0
    scf_n: int = 0


@dataclass
class Overview:
    """Everything the dashboard counts about a campaign, from two GROUP BY passes over
    covering indexes (its structures by source and formula; its labels by round and
    status)."""

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
    label_groups: list[LabelGroup] = field(default_factory=list)
    formulas: list[str] = field(default_factory=list)  # of the campaign's structures

    def count_labels(self, status: list[str] | None = None,
                     rounds: list[int] | None = None) -> int:
        """Labels matching the Data tab's status and round filters, from
        :attr:`label_groups` (with source or formula: :func:`label_count`)."""
        return sum(g.n for g in self.label_groups
                   if (not status or g.status in status) and (not rounds or g.round in rounds))

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


def _label_groups(session, campaign_id: int) -> list[LabelGroup]:
    """One pass over ``ix_labels_campaign_summary`` (index only, grouped in index order);
    round ids become indices through the campaign's few rounds."""
    q = (select(Label.round_id, Label.status, func.count(), func.sum(Label.wall_s),
                func.count(Label.wall_s), func.max(Label.wall_s), func.sum(Label.n_scf_cycles),
                func.count(Label.n_scf_cycles))
         .where(Label.campaign_id == campaign_id).group_by(Label.round_id, Label.status))
    rows = session.execute(q).all()
    index_of = dict(session.execute(select(Round.id, Round.round_index)
                                    .where(Round.campaign_id == campaign_id)).all())
    return [LabelGroup(None if rid is None else index_of[rid], st, int(n), float(ws or 0.0),
                       int(wn), None if wmax is None else float(wmax), float(ss or 0.0),
                       int(sn))
            for rid, st, n, ws, wn, wmax, ss, sn in rows]


def overview(engine: Engine, campaign: str) -> Overview:
    """Counts, budget and the state of the latest round of ``campaign``; labels grouped by
    round, status and source (:class:`LabelGroup`) and the formulas of its structures."""

    def work(session) -> Overview:
        camp = _campaign(session, campaign)
        by_source: dict[str, int] = {}
        formulas: set[str] = set()
        for source, formula, n in session.execute(
                select(Structure.source, Structure.formula, func.count())
                .where(Structure.campaign_id == camp.id)
                .group_by(Structure.source, Structure.formula)):
            by_source[source] = by_source.get(source, 0) + int(n)
            formulas.add(formula)
        groups = _label_groups(session, camp.id)
        by_status: dict[str, int] = {}
        for g in groups:
            by_status[g.status] = by_status.get(g.status, 0) + g.n
        rounds = _rounds(session, camp.id)
        config = dict(camp.config or {})
        out = Overview(name=camp.name, created_at=camp.created_at, config=config,
                       structures=by_source, labels=by_status, n_rounds=len(rounds),
                       labels_requested=sum(g.n for g in groups if g.round is not None),
                       label_budget=(config.get("stop") or {}).get("label_budget"),
                       label_groups=groups, formulas=sorted(formulas))
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


@dataclass(frozen=True)
class ScoreOverview:
    """Aggregates of one round's scores, computed in SQL (exact, whatever the pool size)."""

    n: int
    n_selected: int
    mean: float | None
    mean_selected: float | None
    acquisition: str | None


def _round_id(session, campaign: str, round_index: int) -> int | None:
    camp = _campaign(session, campaign)
    return session.scalar(select(Round.id).where(Round.campaign_id == camp.id,
                                                 Round.round_index == round_index))


def score_overview(engine: Engine, campaign: str, round_index: int) -> ScoreOverview:
    """Candidates scored and selected in one round, mean score of the pool and of the
    selected batch, by one aggregate query over the round's scores."""

    def work(session) -> ScoreOverview:
        rid = _round_id(session, campaign, round_index)
        if rid is None:
            return ScoreOverview(0, 0, None, None, None)
        chosen = case((Score.selected, Score.score), else_=None)
        n, n_sel, mean, mean_sel, acq = session.execute(
            select(func.count(), func.count(chosen), func.avg(Score.score), func.avg(chosen),
                   func.max(Score.acquisition)).where(Score.round_id == rid)).one()
        return ScoreOverview(int(n), int(n_sel), None if mean is None else float(mean),
                             None if mean_sel is None else float(mean_sel), acq)

    return run_transaction(engine, work)


def score_sample(engine: Engine, campaign: str, round_index: int,
                 max_rows: int = 20_000) -> list[dict[str, Any]]:
    """At most ``max_rows`` candidates of one round, as :func:`score_rows` returns them (best
    first): every selected one (up to ``max_rows``) and an evenly spread sample of the others
    (every k-th score id, k chosen from their count), so that a plot of a 100,000-candidate
    pool costs 20,000 rows."""

    def work(session) -> list[dict[str, Any]]:
        rid = _round_id(session, campaign, round_index)
        if rid is None:
            return []
        n_other = session.scalar(select(func.count()).select_from(Score).where(
            Score.round_id == rid, Score.selected.is_(False))) or 0
        cols = (Score.structure_id, Score.acquisition, Score.score, Score.selected,
                Score.rank, Score.components, Structure.source)
        base = (select(*cols).join(Structure, Structure.id == Score.structure_id)
                .where(Score.round_id == rid))
        chosen = list(session.execute(base.where(Score.selected.is_(True))
                                      .order_by(Score.rank).limit(max_rows)))
        room = max_rows - len(chosen)
        others = []
        if room > 0 and n_other:
            stride = -(-n_other // room)  # ceil
            q = base.where(Score.selected.is_(False))
            if stride > 1:
                q = q.where(Score.id % stride == 0)
            others = list(session.execute(q.limit(room)))
        rows = sorted(chosen + others, key=lambda r: -r[2])
        return [{"structure_id": sid, "acquisition": acq, "score": score,
                 "selected": bool(sel), "rank": rank, "source": source, **(comp or {})}
                for sid, acq, score, sel, rank, comp, source in rows]

    return run_transaction(engine, work)


def campaign_version(engine: Engine, campaign: str) -> dict[str, tuple]:
    """Tokens that change whenever what the dashboard shows of ``campaign`` can change, by
    what it depends on: ``labels`` (the newest label id and ``created_at``: a retry
    overwrites a failed label in place and stamps it anew), ``structures`` (the newest
    id), ``scores`` (the newest id and how many candidates the newest round has selected)
    and ``rounds`` (the campaign's rounds: status, labels, finish time). Ids are
    database-wide. A handful of index lookups, whatever the campaign's size."""

    def work(session) -> dict[str, tuple]:
        camp = _campaign(session, campaign)
        label_id, created, structure_id, score_id = session.execute(select(
            select(func.max(Label.id)).scalar_subquery(),
            select(func.max(Label.created_at)).scalar_subquery(),
            select(func.max(Structure.id)).scalar_subquery(),
            select(func.max(Score.id)).scalar_subquery())).one()
        rounds = tuple(tuple(r) for r in session.execute(
            select(Round.id, Round.status, Round.n_labelled, Round.finished_at)
            .where(Round.campaign_id == camp.id).order_by(Round.round_index)))
        n_selected = 0 if not rounds else session.scalar(
            select(func.count()).select_from(Score)
            .where(Score.round_id == rounds[-1][0], Score.selected.is_(True)))
        return {"campaign": (camp.id,), "labels": (label_id, created),
                "structures": (structure_id,), "scores": (score_id, n_selected),
                "rounds": rounds}

    return run_transaction(engine, work)


LABEL_COLUMNS = ["label_id", "structure_id", "formula", "n_atoms", "source", "round",
                  "status", "energy (eV)", "energy/atom (eV)", "max |F| (eV/Å)", "scf cycles",
                  "wall s", "error", "labeler", "method", "basis", "created"]


def _filtered_labels(q, campaign_id: int, *, status: list[str] | None,
                     source: list[str] | None, rounds: list[int] | None,
                     formula: str | None, newest_first: str | None = None):
    """``q`` (selecting from labels) joined to its structures (and rounds) and restricted to
    one campaign and the Data tab's filters.

    ``newest_first`` (the dialect's name) orders by the labels' ``(created_at, id)`` index so
    that a page reads labels from the newest down and stops at its end. Each planner needs
    its own campaign test for that: SQLite (no statistics) would start from any index on the
    campaign column and sort the campaign's labels, so there the test is kept out of index
    selection (``Structure.campaign_id + 0``); PostgreSQL would estimate such an expression
    as selective and do the same, so there it is ``Label.campaign_id``, whose statistics say
    how much of the table the campaign is."""
    if newest_first == "sqlite":
        campaign = Structure.campaign_id + 0
    elif newest_first:
        campaign = Label.campaign_id
    else:
        campaign = Structure.campaign_id
    q = (q.join(Structure, Structure.id == Label.structure_id)
         .outerjoin(Round, Round.id == Label.round_id)
         .where(campaign == campaign_id))
    if newest_first:
        q = q.order_by(Label.created_at.desc(), Label.id.desc())
    if status:
        q = q.where(Label.status.in_(status))
    if source:
        q = q.where(Structure.source.in_(source))
    if rounds:
        q = q.where(Round.round_index.in_(rounds))
    if formula:
        q = q.where(Structure.formula == formula)
    return q


def label_rows(engine: Engine, campaign: str, *, status: list[str] | None = None,
               source: list[str] | None = None, rounds: list[int] | None = None,
               formula: str | None = None, limit: int | None = None,
               offset: int = 0) -> list[tuple]:
    """Labels of a campaign's structures (tuples in :data:`LABEL_COLUMNS` order), newest
    first (by the ``ix_labels_created_at_id`` index: a page costs its own rows), with optional
    filters; ``round`` is the round that requested the label (None: initial/test/imported
    labels). ``limit``/``offset`` page through them."""

    def work(session) -> list[tuple]:
        camp = _campaign(session, campaign)
        q = _filtered_labels(
            select(Label.id, Label.structure_id, Structure.formula, Structure.n_atoms,
                   Structure.source, Round.round_index, Label.status, Label.energy,
                   Label.energy_per_atom, Label.max_force, Label.n_scf_cycles, Label.wall_s,
                   Label.error, Label.labeler, Label.method, Label.basis, Label.created_at),
            camp.id, status=status, source=source, rounds=rounds, formula=formula,
            newest_first=session.get_bind().dialect.name)
        if limit:
            q = q.limit(limit)
        if offset:
            q = q.offset(offset)
        return [tuple(r) for r in session.execute(q)]

    return run_transaction(engine, work)


def label_timeline(engine: Engine, campaign: str, limit: int) -> list[tuple]:
    """(created_at, wall_s, n_scf_cycles, status) of the campaign's newest ``limit`` labels,
    newest first (the Labeling tab's plot; read from the end of ``ix_labels_created_at_id``)."""

    def work(session) -> list[tuple]:
        camp = _campaign(session, campaign)
        q = _filtered_labels(select(Label.created_at, Label.wall_s, Label.n_scf_cycles,
                                    Label.status), camp.id, status=None, source=None,
                             rounds=None, formula=None,
                             newest_first=session.get_bind().dialect.name).limit(limit)
        return [tuple(r) for r in session.execute(q)]

    return run_transaction(engine, work)


def label_count(engine: Engine, campaign: str, *, status: list[str] | None = None,
                source: list[str] | None = None, rounds: list[int] | None = None,
                formula: str | None = None) -> int:
    """How many labels :func:`label_rows` would return without a limit (one COUNT)."""

    def work(session) -> int:
        camp = _campaign(session, campaign)
        q = _filtered_labels(select(func.count()).select_from(Label), camp.id, status=status,
                             source=source, rounds=rounds, formula=formula)
        return int(session.scalar(q) or 0)

    return run_transaction(engine, work)


@dataclass(frozen=True)
class LabelFilters:
    """What the Data tab's filters offer: the distinct values among a campaign's labels."""

    total: int
    status: list[str]
    source: list[str]
    rounds: list[int]
    formula: list[str]


def label_filters(ov: Overview) -> LabelFilters:
    """What the Data tab's filters offer, from an :class:`Overview` (no query): the statuses
    and requesting rounds among the campaign's labels, its structures' sources and
    formulas."""
    groups = ov.label_groups
    return LabelFilters(total=sum(g.n for g in groups),
                        status=sorted({g.status for g in groups}),
                        source=sorted(ov.structures),
                        rounds=sorted({g.round for g in groups if g.round is not None}),
                        formula=list(ov.formulas))


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
