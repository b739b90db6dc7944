"""`bayesal import`: files -> structures (+ reference labels), one transaction per call."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ase import Atoms
from sqlalchemy import Engine

from bayesal.contracts import settings_hash
from bayesal.db.engine import ensure_schema
from bayesal.db.identity import atoms_hash
from bayesal.db.ingest import (
    LabelRecord,
    StoreReport,
    get_or_create_campaign,
    json_scalars,
    run_transaction,
    structure_row,
    upsert_labels,
    upsert_structures,
)
from bayesal.db.models import StructureSource
from bayesal.db.readers import (
    ENERGY_KEYS,
    Frame,
    InputError,
    InputIssue,
    check_distances,
    iter_frames,
    validate_frame,
)

__all__ = ["ReferenceLevel", "import_atoms", "import_files", "import_frames"]


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
    labelled: bool = False,
    energy_key: str | None = None,
    forces_key: str | None = None,
    **kwargs,
) -> StoreReport:
    """Import structure files into a campaign (created if needed), all-or-nothing.

    Every frame of every file is validated; if any is bad, an :class:`InputError` lists
    all problems (file, frame, field) and the database is left exactly as it was. A
    structure already stored (same hash) is counted as a duplicate and skipped; with
    ``labelled`` its reference label is added if it has none under the same level.
    Other keyword arguments as for :func:`import_frames`.
    """
    frames = itertools.chain.from_iterable(
        iter_frames(p, labelled=labelled, energy_key=energy_key, forces_key=forces_key,
                    distances=False)
        for p in paths
    )
    return import_frames(engine, frames, campaign, labelled=labelled, **kwargs)


def import_atoms(
    engine: Engine,
    images: Iterable[Atoms],
    campaign: str,
    *,
    labelled: bool = False,
    name: str = "<memory>",
    **kwargs,
) -> StoreReport:
    """:func:`import_files` for in-memory ``Atoms`` (labels from their calculators)."""
    def frames() -> Iterator[Frame | InputIssue]:
        for i, atoms in enumerate(images):
            frame, issues = validate_frame(name, i, atoms, labelled=labelled,
                                           check_distances=False)
            if frame is not None:
                yield frame
            yield from issues

    return import_frames(engine, frames(), campaign, labelled=labelled, **kwargs)


def import_frames(
    engine: Engine,
    frames: Iterable[Frame | InputIssue],
    campaign: str,
    *,
    source: StructureSource | str = StructureSource.POOL,
    labelled: bool = False,
    level: ReferenceLevel | None = None,
    batch_size: int = 2000,
    on_frame: Callable[[int], None] | None = None,
) -> StoreReport:
    """Store validated frames in one transaction; any issue rolls everything back.

    Parameters
    ----------
    frames
        Frames and the issues found while reading them (:func:`db.readers.iter_frames`);
        the too-close-atoms check is run here, per batch.
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
            good, bad = check_distances(batch)
            issues.extend(bad)
            if not issues and good:  # after the first problem: validate only, write nothing
                report.merge(_store_batch(session, camp.id, good, src, labelled, level))
            batch.clear()

        for item in frames:
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
            raise InputError(sorted(issues, key=_order()))  # rolls back the transaction
        return report

    # No automatic retry: ``frames`` is a one-shot iterator (a retry would see it empty).
    return run_transaction(engine, work, retries=0)


def _order():
    """Sort key of issues: files in the order first seen, then frame index."""
    seen: dict[str, int] = {}

    def key(issue: InputIssue) -> tuple[int, int]:
        return seen.setdefault(issue.file, len(seen)), -1 if issue.frame is None else issue.frame

    return key


@functools.lru_cache(maxsize=256)
def _resolved(file: str) -> str:
    return str(Path(file).resolve()) if not file.startswith("<") else file


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
        settings, shash = level.settings, level.settings_hash
        items = [
            (sid, LabelRecord(
                labeler="reference", settings_hash=shash, status="ok",
                energy=f.energy, forces=f.forces, method=settings["method"],
                basis=settings["basis"], settings=settings,
                provenance={"file": _resolved(f.file), "frame": f.index},
            ))
            for sid, f in zip(ids, batch, strict=True)
        ]
        report.n_labels_new = upsert_labels(session, items)
        report.n_labels_existing = len(items) - report.n_labels_new
    return report
