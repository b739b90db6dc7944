"""Labeling glue between labelers/ and db/ (plain functions; Prefect wrappers build on them).

Each result is stored in its own short transaction as soon as it arrives, so a killed run
keeps every label it finished, and a rerun skips structures already labelled under the
same labeler settings.
"""

from __future__ import annotations

from collections.abc import Sequence

from ase import Atoms
from sqlalchemy import Engine, select

from db import Label, Structure, StructureSource
from db.identity import atoms_hash
from db.ingest import (
    LabelRecord,
    get_or_create_campaign,
    run_transaction,
    structure_row,
    upsert_labels,
    upsert_structures,
)
from labelers import Labeler, LabelResult

__all__ = ["existing_labels", "label_record", "store_results"]


def label_record(labeler: Labeler, result: LabelResult) -> LabelRecord:
    """The database record of a labeler's result."""
    return LabelRecord(
        labeler=labeler.name, settings_hash=labeler.settings_hash, status=result.status,
        energy=result.energy, forces=result.forces, method=labeler.method,
        basis=labeler.basis, settings=labeler.settings, n_scf_cycles=result.n_scf_cycles,
        wall_s=result.wall_s, error=result.error, provenance=result.provenance,
    )


def store_results(
    engine: Engine,
    campaign: str,
    labeler: Labeler,
    items: Sequence[tuple[Atoms, LabelResult]],
    *,
    source: StructureSource | str = StructureSource.POOL,
    round_id: int | None = None,
    replace_failed: bool = True,
) -> int:
    """Store structures (if new) and their labels in one transaction; returns labels written.

    Failed results are stored too (status and reason); a later ok result for the same
    structure and settings replaces a failed one, an ok label is never overwritten.
    """

    def work(session) -> int:
        camp = get_or_create_campaign(session, campaign)
        rows = [structure_row(a, camp.id, source) for a, _ in items]
        ids, _ = upsert_structures(session, rows)
        pairs = [(sid, label_record(labeler, res)) for sid, (_, res) in zip(ids, items,
                                                                           strict=True)]
        return upsert_labels(session, pairs, round_id=round_id, replace_failed=replace_failed)

    return run_transaction(engine, work)


def existing_labels(
    engine: Engine, campaign: str, images: Sequence[Atoms], settings_hash: str,
    *, ok_only: bool = True,
) -> dict[int, Label]:
    """Labels already stored for ``images`` (by index) under ``settings_hash``."""
    by_hash: dict[str, list[int]] = {}
    for i, atoms in enumerate(images):
        by_hash.setdefault(atoms_hash(atoms), []).append(i)
    out: dict[int, Label] = {}

    def work(session) -> None:
        camp = get_or_create_campaign(session, campaign)
        hashes = list(by_hash)
        for start in range(0, len(hashes), 2000):
            q = (select(Structure.hash, Label)
                 .join(Label, Label.structure_id == Structure.id)
                 .where(Structure.campaign_id == camp.id,
                        Structure.hash.in_(hashes[start:start + 2000]),
                        Label.settings_hash == settings_hash))
            if ok_only:
                q = q.where(Label.status == "ok")
            for h, label in session.execute(q):
                for i in by_hash[h]:
                    out[i] = label

    run_transaction(engine, work)
    return out
