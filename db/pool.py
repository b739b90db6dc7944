"""Candidate pools read from the database in chunks (keyset pagination, short reads)."""

from __future__ import annotations

from collections.abc import Iterator

from ase import Atoms
from sqlalchemy import Engine, exists, select

from db.engine import DatabaseError, session_scope
from db.models import Campaign, Label, Structure

__all__ = ["iter_unlabelled"]


def iter_unlabelled(engine: Engine, campaign: str, *, settings_hash: str | None = None,
                    chunk_size: int = 500) -> Iterator[tuple[int, Atoms]]:
    """(structure id, Atoms) of the campaign's structures without a label (under
    ``settings_hash``, or under any settings when None), in id order.

    Failed labels count as labels: a structure whose SCF failed is not offered again. Each
    chunk is read in its own short transaction, so writers are never blocked for long and
    memory stays flat in the pool size.
    """
    with session_scope(engine) as session:
        campaign_id = session.scalar(select(Campaign.id).where(Campaign.name == campaign))
        if campaign_id is None:
            names = session.scalars(select(Campaign.name).order_by(Campaign.name)).all()
            raise DatabaseError(f"no campaign named {campaign!r} (existing: "
                                f"{', '.join(names) or 'none'})")
    labelled = select(Label.id).where(Label.structure_id == Structure.id)
    if settings_hash is not None:
        labelled = labelled.where(Label.settings_hash == settings_hash)
    last = -1
    while True:
        with session_scope(engine) as session:
            rows = session.execute(
                select(Structure.id, Structure.numbers, Structure.positions, Structure.cell,
                       Structure.pbc, Structure.info)
                .where(Structure.campaign_id == campaign_id, Structure.id > last,
                       ~exists(labelled))
                .order_by(Structure.id).limit(chunk_size)).all()
        if not rows:
            return
        for sid, numbers, positions, cell, pbc, info in rows:
            atoms = Atoms(numbers=numbers, positions=positions, cell=cell,
                          pbc=[c == "T" for c in pbc], info={**info, "structure_id": sid})
            yield sid, atoms
        last = rows[-1][0]
