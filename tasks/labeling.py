"""Labeling glue between labelers/ and db/ (plain functions; Prefect wrappers build on them).

Each result is stored in its own short transaction as soon as it arrives, so a killed run
keeps every label it finished, and a rerun skips structures already labelled under the
same labeler settings.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ase import Atoms
from sqlalchemy import Engine

from bayesal.db import StructureSource
from bayesal.db.ingest import (
    LabelRecord,
    get_or_create_campaign,
    run_transaction,
    structure_row,
    upsert_labels,
    upsert_structures,
)
from bayesal.labelers import Labeler, LabelerConfig, LabelerInputError, LabelResult

__all__ = ["build_labeler", "compute_label", "label_record", "store_results"]


def build_labeler(config: LabelerConfig | dict[str, Any],
                  guess_dir: str | Path | None = None) -> Labeler:
    """The labeler of a campaign's ``labeler:`` section, built once per process (labels of a
    round run as many tasks; the replay labeler reads its files once). A Dask task runner
    delivers the section as a dict."""
    config = LabelerConfig.model_validate(config)
    return _cached_labeler(config.model_dump_json(),
                           None if guess_dir is None else str(guess_dir))


@functools.lru_cache(maxsize=8)
def _cached_labeler(config_json: str, guess_dir: str | None) -> Labeler:
    return LabelerConfig.model_validate_json(config_json).build(guess_dir)


def compute_label(labeler: Labeler, atoms: Atoms) -> LabelResult:
    """Label one structure; input the labeler refuses becomes an ``error`` result naming
    the problem (recorded like any failure) instead of an exception."""
    try:
        return labeler.label(atoms)
    except LabelerInputError as exc:
        return LabelResult(status="error", error=f"input refused by the labeler: {exc}",
                           wall_s=0.0, provenance={"settings": labeler.settings})


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
