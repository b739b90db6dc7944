"""`bayesal import`: files -> structures (+ reference labels), one transaction per call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from db.engine import ensure_schema
from db.identity import atoms_hash
from db.ingest import (
    LabelRecord,
    StoreReport,
    get_or_create_campaign,
    json_scalars,
    label_row,
    run_transaction,
    settings_hash,
    structure_row,
    upsert_labels,
    upsert_structures,
)
from db.models import LabelStatus, StructureSource
from db.readers import ENERGY_KEYS, Frame, InputError, InputIssue, iter_frames

__all__ = ["ReferenceLevel", "import_files"]


@dataclass(frozen=True)
class ReferenceLevel:
    """Level of theory of labels that come with imported files (``labeler = "reference"``).

    Labels from files with equal levels share one settings hash, hence are comparable.
    """

    method: str = "unknown"
    basis: str = "unknown"

    @property
    def settings(self) -> dict[str, str]:
        return {"labeler": "reference", "method": self.method.lower(),
                "basis": self.basis.lower()}

    @property
    def settings_hash(self) -> str:
        return settings_hash(self.settings)


def import_files(
    engine: Engine,
    paths: Sequence[str | Path],
    campaign: str,
    *,
    source: StructureSource | str = StructureSource.POOL,
    labelled: bool = False,
    level: ReferenceLevel | None = None,
    energy_key: str | None = None,
    forces_key: str | None = None,
    batch_size: int = 2000,
    on_frame: Callable[[int], None] | None = None,
) -> StoreReport:
    """Import structure files into a campaign (created if needed), all-or-nothing.

    Every frame of every file is validated; if any is bad, an :class:`InputError` lists
    all problems (file, frame, field) and the database is left exactly as it was. A
    structure already stored (same hash) is counted as a duplicate and skipped; with
    ``labelled`` its reference label is added if it has none under the same level.

    Parameters
    ----------
    on_frame
        Called with the number of frames read so far, for progress bars.
    """
    ensure_schema(engine, create=True)
    level = level or ReferenceLevel()
    src = StructureSource(source)

    def work(session) -> StoreReport:
        camp = get_or_create_campaign(session, campaign)
        report = StoreReport()
        issues: list[InputIssue] = []
        batch: list[Frame] = []

        def flush() -> None:
            if issues or not batch:  # after the first problem: validate only, write nothing
                batch.clear()
                return
            report.merge(_store_batch(session, camp.id, batch, src, labelled, level))
            batch.clear()

        for path in paths:
            for item in iter_frames(path, labelled=labelled, energy_key=energy_key,
                                    forces_key=forces_key):
                if isinstance(item, InputIssue):
                    issues.append(item)
                    continue
                report.n_frames += 1
                batch.append(item)
                if len(batch) >= batch_size:
                    flush()
                if on_frame is not None:
                    on_frame(report.n_frames)
        flush()
        if issues:
            raise InputError(issues)  # rolls back the whole transaction
        return report

    return run_transaction(engine, work)


def _store_batch(session, campaign_id: int, batch: list[Frame], source: StructureSource,
                 labelled: bool, level: ReferenceLevel) -> StoreReport:
    rows = [
        structure_row(f.atoms, campaign_id, source, hash_=atoms_hash(f.atoms),
                      info=json_scalars(f.atoms.info, exclude=ENERGY_KEYS))
        for f in batch
    ]
    ids, n_new = upsert_structures(session, rows)
    report = StoreReport(n_structures_new=n_new, n_structures_duplicate=len(rows) - n_new,
                         structure_ids=ids)
    if labelled:
        label_rows = [
            label_row(sid, LabelRecord(
                labeler="reference", settings_hash=level.settings_hash,
                status=LabelStatus.OK.value, energy=f.energy, forces=f.forces,
                method=level.method.lower(), basis=level.basis.lower(), settings=level.settings,
                provenance={"file": str(Path(f.file).resolve()), "frame": f.index},
            ))
            for sid, f in zip(ids, batch, strict=True)
        ]
        report.n_labels_new = upsert_labels(session, label_rows)
        report.n_labels_existing = len(label_rows) - report.n_labels_new
    return report
