"""Concurrent writers: no duplicate, no lost row, no crash (real PostgreSQL and SQLite)."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
from ase import Atoms
from sqlalchemy import func, select

from bayesal.db import Label, Structure, make_engine, session_scope, upgrade
from bayesal.db.ingest import (
    LabelRecord,
    get_or_create_campaign,
    run_transaction,
    settings_hash,
    structure_row,
    upsert_labels,
    upsert_structures,
)

N_TOTAL, N_PER_WORKER, N_WORKERS = 120, 60, 4
SETTINGS = {"labeler": "test", "method": "hf", "basis": "sto-3g"}


def make_atoms(k: int) -> Atoms:
    rng = np.random.default_rng(k)
    water = np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    return Atoms("OH2", positions=water + rng.normal(scale=0.02, size=(3, 3)))


def worker(url: str, wid: int, barrier, batch: int) -> None:
    # Overlapping windows in different orders: worker w labels structures
    # [30 w, 30 w + 60) mod 120, half of them in reverse order.
    ks = [(30 * wid + i) % N_TOTAL for i in range(N_PER_WORKER)]
    if wid % 2:
        ks.reverse()
    engine = make_engine(url)
    barrier.wait()
    for start in range(0, len(ks), batch):
        chunk = ks[start : start + batch]

        def work(session, chunk=chunk):
            camp = get_or_create_campaign(session, "race")
            atoms = [make_atoms(k) for k in chunk]
            ids, _ = upsert_structures(session, [structure_row(a, camp.id, "pool")
                                                 for a in atoms])
            items = [(sid, LabelRecord(
                labeler="test", settings_hash=settings_hash(SETTINGS), status="ok",
                energy=-float(k), forces=np.full((3, 3), float(k)), settings=SETTINGS,
                provenance={"worker": wid})) for sid, k in zip(ids, chunk, strict=True)]
            upsert_labels(session, items)

        run_transaction(engine, work, retries=20)
    engine.dispose()


def run_race(url: str, batch: int) -> None:
    engine = make_engine(url)
    upgrade(engine)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(N_WORKERS)
    procs = [ctx.Process(target=worker, args=(url, w, barrier, batch)) for w in range(N_WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0] * N_WORKERS

    with session_scope(engine) as s:
        assert s.scalar(select(func.count()).select_from(Structure)) == N_TOTAL
        assert s.scalar(select(func.count()).select_from(Label)) == N_TOTAL
        dup = s.execute(select(Structure.hash).group_by(Structure.hash)
                        .having(func.count() > 1)).all()
        assert dup == []
        # Every label sits on the right structure: energy -k belongs to make_atoms(k).
        for label, structure in s.execute(select(Label, Structure).join(Structure)):
            k = round(-label.energy)
            np.testing.assert_array_equal(structure.positions, make_atoms(k).positions)
            np.testing.assert_array_equal(label.forces, np.full((3, 3), float(k)))
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("batch", [1, 20])
def test_four_processes_on_postgres(pg_url, batch):
    run_race(pg_url, batch)


def test_four_processes_on_sqlite(sqlite_url):
    run_race(sqlite_url, 10)
