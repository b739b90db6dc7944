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

from db.ingest import (
    _execute_counting,
    _insert,
    get_or_create_campaign,
    json_scalars,
    run_transaction,
)
from db.models import Campaign, Round, RoundStatus, Score

__all__ = ["RoundInfo", "ScoreRow", "campaign_rounds", "finish_round", "open_round",
           "record_scores", "selected_structure_ids"]


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
