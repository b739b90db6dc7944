"""Round bookkeeping: a restarted campaign resumes its running round, never counts a round
twice, and reuses a stored selection."""

from __future__ import annotations

from helpers import rattled_waters
from sqlalchemy import func, select

from bayesal.db import Round, Score, Structure, session_scope
from bayesal.db.importer import import_atoms
from bayesal.db.rounds import (
    ScoreRow,
    campaign_rounds,
    finish_round,
    open_round,
    record_scores,
    selected_structure_ids,
)


def test_rounds_resume_and_stay_contiguous(engine):
    first = open_round(engine, "c")
    assert (first.index, first.resumed) == (0, False)
    again = open_round(engine, "c")  # a restart while round 0 runs
    assert (again.id, again.index, again.resumed) == (first.id, 0, True)
    finish_round(engine, first.id, metrics={"force_mae": 0.1, "bad": float("nan")},
                 n_labelled=3)
    finish_round(engine, first.id, metrics={"force_mae": 9.9}, n_labelled=99)  # no effect
    second = open_round(engine, "c")
    assert (second.index, second.resumed) == (1, False)
    assert campaign_rounds(engine, "c") == [(0, "completed"), (1, "running")]
    assert open_round(engine, "other").index == 0  # per campaign
    with session_scope(engine) as s:
        r0 = s.get(Round, first.id)
        assert r0.metrics == {"force_mae": 0.1} and r0.n_labelled == 3
        assert s.scalar(select(func.count()).select_from(Round)) == 3


def test_scores_and_selection_are_stored_once(engine):
    images = rattled_waters(5)
    import_atoms(engine, images, "c")
    r = open_round(engine, "c")
    assert selected_structure_ids(engine, r.id) == []
    with session_scope(engine) as s:
        ids = list(s.scalars(select(Structure.id).order_by(Structure.id)))
    rows = [ScoreRow(sid, float(k), {"bald_e": 0.1 * k}, rank={3: 0, 1: 1}.get(k))
            for k, sid in enumerate(ids)]
    assert record_scores(engine, r.id, "bald-ef", rows) == 5
    assert record_scores(engine, r.id, "bald-ef", rows) == 0  # a restart re-records nothing
    assert selected_structure_ids(engine, r.id) == [ids[3], ids[1]]
    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(Score)) == 5
        comp = s.scalars(select(Score.components).where(Score.structure_id == ids[2])).one()
        assert comp == {"bald_e": 0.2}
