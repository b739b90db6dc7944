"""Candidate pools read from the database: unlabelled structures in chunks."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import molecule
from helpers import rattled_waters
from sqlalchemy import select

from bayesal.db import DatabaseError, Structure, session_scope
from bayesal.db.importer import import_atoms
from bayesal.db.ingest import LabelRecord, upsert_labels
from bayesal.db.pool import iter_unlabelled


def test_unlabelled_structures_in_chunks(engine):
    images = rattled_waters(11)
    import_atoms(engine, images, "c")
    import_atoms(engine, [molecule("CH4")], "other")
    with session_scope(engine) as s:
        ids = s.scalars(select(Structure.id).join(Structure.campaign)
                        .where(Structure.campaign.has(name="c")).order_by(Structure.id)).all()
        upsert_labels(s, [(ids[0], LabelRecord("pyscf", "h1", "ok", energy=-1.0,
                                               forces=np.zeros((3, 3)))),
                          (ids[1], LabelRecord("pyscf", "h1", "scf_failed", error="x")),
                          (ids[2], LabelRecord("pyscf", "h2", "ok", energy=-1.0,
                                               forces=np.zeros((3, 3))))])
    got = list(iter_unlabelled(engine, "c", settings_hash="h1", chunk_size=4))
    assert [sid for sid, _ in got] == ids[2:]  # a failed label is not offered again
    np.testing.assert_array_equal(got[0][1].positions, images[2].positions)
    assert got[0][1].info["structure_id"] == ids[2]
    assert [sid for sid, _ in iter_unlabelled(engine, "c", chunk_size=3)] == ids[3:]
    with pytest.raises(DatabaseError, match=r"no campaign named 'x'.*c, other"):
        list(iter_unlabelled(engine, "x"))
