"""Round bookkeeping of a campaign: the database decides where a restarted campaign goes on.

* :func:`open_round` returns the running round if there is one (a restart resumes it),
  otherwise starts the next index; indices stay contiguous and a round is never counted twice
  (unique campaign x index, insert-or-nothing).
* :func:`record_scores` stores a round's scores and its selection once; a restarted round
  reuses the stored selection (:func:`selected_structure_ids`) instead of scoring again.
* :func:`finish_round` marks it completed with its metrics (idempotent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select, update

from bayesal.contracts import ACQUISITION_COMPONENTS
from bayesal.contracts import RoundMetric as M
from bayesal.db.ingest import (
    _execute_counting,
    _insert,
    get_or_create_campaign,
    json_scalars,
    run_transaction,
)
from bayesal.db.models import Campaign, Model, Round, RoundStatus, Score

__all__ = ["ModelRow", "RoundInfo", "ScoreRow", "campaign_rounds", "finish_round",
           "mark_selected", "open_round", "record_models", "record_scores", "round_history",
           "round_models", "score_summary", "selected_structure_ids"]


@dataclass(frozen=True)
class RoundInfo:
    id: int
    index: int
    resumed: bool  # True: the round was already running (a restart)


@dataclass(frozen=True)
class ScoreRow:
    structure_id: int
    score: float
    components: dict[str, float]
    rank: int | None = None  # selection rank (0 = first), None if not selected


def open_round(engine: Engine, campaign: str) -> RoundInfo:
    """The campaign's running round, or a new one with the next contiguous index."""

    def work(session) -> RoundInfo:
        camp = get_or_create_campaign(session, campaign)
        running = session.scalars(
            select(Round).where(Round.campaign_id == camp.id,
                                Round.status == RoundStatus.RUNNING.value)
            .order_by(Round.round_index)).first()
        if running is not None:
            return RoundInfo(running.id, running.round_index, resumed=True)
        last = session.scalar(select(func.max(Round.round_index))
                              .where(Round.campaign_id == camp.id))
        index = 0 if last is None else last + 1
        stmt = _insert(session, Round.__table__).on_conflict_do_nothing(
            index_elements=["campaign_id", "round_index"])
        session.execute(stmt, [{"campaign_id": camp.id, "round_index": index,
                                "status": RoundStatus.RUNNING.value,
                                "started_at": datetime.now(UTC), "metrics": {},
                                "n_labelled": 0}])
        row = session.scalars(select(Round).where(Round.campaign_id == camp.id,
                                                  Round.round_index == index)).one()
        return RoundInfo(row.id, row.round_index, resumed=False)

    return run_transaction(engine, work)


def record_scores(engine: Engine, round_id: int, acquisition: str,
                  rows: Sequence[ScoreRow]) -> int:
    """Store scores (and ranks of the selected) of a round; rows already stored are kept.
    Returns how many were written."""
    if not rows:
        return 0

    def work(session) -> int:
        stmt = _insert(session, Score.__table__).on_conflict_do_nothing(
            index_elements=["round_id", "structure_id", "acquisition"])
        values = [{"round_id": round_id, "structure_id": r.structure_id,
                   "acquisition": acquisition, "score": float(r.score),
                   "components": json_scalars(r.components), "selected": r.rank is not None,
                   "rank": r.rank} for r in rows]
        return _execute_counting(session, stmt, Score.__table__, values)

    return run_transaction(engine, work)


def mark_selected(engine: Engine, round_id: int, acquisition: str,
                  selected: Sequence[ScoreRow]) -> None:
    """Mark a round's selection (ranks in order) in one transaction: scores already stored
    (e.g. chunk by chunk while scoring) are updated, missing ones inserted. A round whose
    selection is marked is never selected again."""

    def work(session) -> None:
        stmt = _insert(session, Score.__table__).on_conflict_do_nothing(
            index_elements=["round_id", "structure_id", "acquisition"])
        session.execute(stmt, [{"round_id": round_id, "structure_id": r.structure_id,
                                "acquisition": acquisition, "score": float(r.score),
                                "components": json_scalars(r.components), "selected": False,
                                "rank": None} for r in selected])
        for rank, r in enumerate(selected):
            session.execute(update(Score)
                            .where(Score.round_id == round_id,
                                   Score.structure_id == r.structure_id,
                                   Score.acquisition == acquisition)
                            .values(selected=True, rank=rank))

    if selected:
        run_transaction(engine, work)


def selected_structure_ids(engine: Engine, round_id: int) -> list[int]:
    """Structures selected in a round, in selection order (empty: not selected yet)."""

    def work(session) -> list[int]:
        return list(session.scalars(select(Score.structure_id)
                                    .where(Score.round_id == round_id, Score.selected)
                                    .order_by(Score.rank)))

    return run_transaction(engine, work)


def finish_round(engine: Engine, round_id: int, *, metrics: dict[str, Any],
                 n_labelled: int, status: RoundStatus = RoundStatus.COMPLETED) -> None:
    """Close a round with its metrics; closing a closed round changes nothing."""

    def work(session) -> None:
        session.execute(update(Round)
                        .where(Round.id == round_id,
                               Round.status == RoundStatus.RUNNING.value)
                        .values(status=status.value, metrics=json_scalars(metrics),
                                n_labelled=n_labelled, finished_at=datetime.now(UTC)))

    run_transaction(engine, work)


def campaign_rounds(engine: Engine, campaign: str) -> list[tuple[int, str]]:
    """(index, status) of a campaign's rounds in order."""

    def work(session) -> list[tuple[int, str]]:
        return [tuple(r) for r in session.execute(
            select(Round.round_index, Round.status).join(Campaign)
            .where(Campaign.name == campaign).order_by(Round.round_index))]

    return run_transaction(engine, work)


@dataclass(frozen=True)
class ModelRow:
    member_index: int
    checkpoint_path: str
    sha256: str
    hyperparameters: dict[str, Any]


def record_models(engine: Engine, round_id: int, method: str, rows: Sequence[ModelRow]) -> None:
    """Register a round's trained model (one row per member/state file), once."""

    def work(session) -> None:
        stmt = _insert(session, Model.__table__).on_conflict_do_nothing(
            index_elements=["round_id", "method", "member_index"])
        session.execute(stmt, [{"round_id": round_id, "method": method,
                                "member_index": r.member_index,
                                "checkpoint_path": r.checkpoint_path, "sha256": r.sha256,
                                "hyperparameters": json_scalars(r.hyperparameters)}
                               for r in rows])

    run_transaction(engine, work)


def round_models(engine: Engine, round_id: int) -> list[ModelRow]:
    """The models registered for a round, by member index (empty: not trained yet)."""

    def work(session) -> list[ModelRow]:
        return [ModelRow(m.member_index, m.checkpoint_path, m.sha256, m.hyperparameters)
                for m in session.scalars(select(Model).where(Model.round_id == round_id)
                                         .order_by(Model.member_index))]

    return run_transaction(engine, work)


def round_history(engine: Engine, campaign: str) -> list[dict[str, Any]]:
    """Every round of a campaign in order: index, status, labels, metrics, times."""

    def work(session) -> list[dict[str, Any]]:
        rows = session.scalars(select(Round).join(Campaign).where(Campaign.name == campaign)
                               .order_by(Round.round_index))
        return [{"round": r.round_index, "id": r.id, "status": r.status,
                 "n_labelled": r.n_labelled, "metrics": dict(r.metrics or {}),
                 "started_at": r.started_at, "finished_at": r.finished_at} for r in rows]

    return run_transaction(engine, work)


def score_summary(engine: Engine, round_id: int) -> dict[str, float]:
    """Scores of a round: how many candidates were scored, max/mean score of the pool and of
    the selected batch, and the mean BALD components of the batch."""

    def work(session) -> dict[str, float]:
        # the pool's figures in SQL (a pool may hold millions); only the batch is read
        n, top, mean = session.execute(
            select(func.count(), func.max(Score.score), func.avg(Score.score))
            .where(Score.round_id == round_id)).one()
        out: dict[str, float] = {M.N_SCORED: int(n)}
        if not n:
            return out
        chosen = session.execute(select(Score.score, Score.selected, Score.components)
                                 .where(Score.round_id == round_id, Score.selected)).all()
        out.update(pool_score_max=float(top), pool_score_mean=float(mean),
                   n_selected=len(chosen))
        if chosen:
            out.update(selected_score_max=max(r[0] for r in chosen),
                       selected_score_mean=sum(r[0] for r in chosen) / len(chosen))
            for key in ACQUISITION_COMPONENTS:
                values = [r[2][key] for r in chosen if key in r[2]]
                if values:
                    out[f"selected_{key}_mean"] = sum(values) / len(values)
        return out

    return run_transaction(engine, work)
