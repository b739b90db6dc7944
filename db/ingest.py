"""Writing structures and labels: bulk, idempotent, safe under concurrent writers.

Every writer here uses ``INSERT ... ON CONFLICT`` against the unique keys
(campaign × structure hash, structure × labeler-settings hash), so the same structure or
label arriving twice, from one process or several at once, is stored once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from ase import Atoms
from sqlalchemy import Engine, Table, bindparam, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from bayesal.contracts import settings_hash
from bayesal.db.engine import session_scope
from bayesal.db.identity import atoms_hash, hill_formula, pbc_string
from bayesal.db.models import (
    Campaign,
    Label,
    LabelerSettings,
    LabelStatus,
    Structure,
    StructureSource,
)

log = logging.getLogger("bayesal.db")

__all__ = [
    "LabelRecord",
    "StoreReport",
    "get_campaign",
    "get_or_create_campaign",
    "json_scalars",
    "label_row",
    "run_transaction",
    "settings_hash",
    "structure_row",
    "upsert_labeler_settings",
    "upsert_labels",
    "upsert_structures",
]


@dataclass(frozen=True)
class LabelRecord:
    """A label to store. Plain data: labelers' results are converted to this by tasks/."""

    labeler: str  # "pyscf", "replay", "reference", ...
    settings_hash: str  # labels with equal hashes are comparable
    status: str  # LabelStatus value
    energy: float | None = None  # eV
    forces: np.ndarray | None = None  # (n_atoms, 3) eV/Å
    method: str | None = None
    basis: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    n_scf_cycles: int | None = None
    wall_s: float | None = None
    error: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class StoreReport:
    """What a store operation did."""

    n_frames: int = 0
    n_structures_new: int = 0
    n_structures_duplicate: int = 0
    n_labels_new: int = 0
    n_labels_existing: int = 0
    structure_ids: list[int] = field(default_factory=list)

    def merge(self, other: StoreReport) -> None:
        """Add the counts (and ids) of ``other`` to this report."""
        self.n_frames += other.n_frames
        self.n_structures_new += other.n_structures_new
        self.n_structures_duplicate += other.n_structures_duplicate
        self.n_labels_new += other.n_labels_new
        self.n_labels_existing += other.n_labels_existing
        self.structure_ids.extend(other.structure_ids)


def _now() -> datetime:
    return datetime.now(UTC)


def json_scalars(info: dict[str, Any], exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON-representable scalar entries of an ``Atoms.info`` dict."""
    out: dict[str, Any] = {}
    skip = set(exclude)
    for key, value in info.items():
        if key in skip:
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool | int | str) or (
            isinstance(value, float) and np.isfinite(value)
        ):
            out[str(key)] = value
    return out


def _insert(session: Session, table: Table):
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"no upsert for database dialect {dialect!r}")


def _execute_counting(session: Session, stmt, table: Table, rows: list[dict[str, Any]]) -> int:
    """Execute a multi-row upsert; returns how many rows it wrote.

    On SQLite the rows go straight to the driver's C ``executemany`` after each column's
    own bind processor (JSON, arrays, timestamps: the exact values SQLAlchemy would send),
    which halves the per-row cost of bulk imports; its rowcount is exact. PostgreSQL uses
    SQLAlchemy's batched multi-VALUES inserts and counts the ids they return.
    """
    dialect = session.get_bind().dialect
    if dialect.name != "sqlite":
        return len(session.execute(stmt.returning(table.c.id), rows).all())
    cols = list(rows[0])
    compiled = stmt.values({c: bindparam(c) for c in cols}).compile(dialect=dialect)
    order = compiled.positiontup or []
    if not set(order) <= set(cols):  # constants in the statement (e.g. an upsert's WHERE)
        return session.execute(stmt, rows).rowcount
    columns = []
    for c in order:  # column by column: one bind processor mapped over all rows
        values = [row[c] for row in rows]
        proc = table.c[c].type.dialect_impl(dialect).bind_processor(dialect)
        columns.append(values if proc is None else list(map(proc, values)))
    params = list(zip(*columns, strict=True))
    return session.connection().exec_driver_sql(str(compiled), params).rowcount


def get_campaign(session: Session, name: str) -> Campaign | None:
    return session.scalars(select(Campaign).where(Campaign.name == name)).one_or_none()


def get_or_create_campaign(
    session: Session, name: str, config: dict[str, Any] | None = None
) -> Campaign:
    """The campaign called ``name``, created (race-free) if missing."""
    if not name or len(name) > 200:
        raise ValueError("a campaign name must have 1 to 200 characters")
    stmt = _insert(session, Campaign.__table__).on_conflict_do_nothing(index_elements=["name"])
    session.execute(stmt, [{"name": name, "config": config or {}}])
    campaign = get_campaign(session, name)
    assert campaign is not None  # inserted or already there, inside this transaction
    return campaign


def structure_row(
    atoms: Atoms,
    campaign_id: int,
    source: StructureSource | str,
    *,
    parent_id: int | None = None,
    info: dict[str, Any] | None = None,
    hash_: str | None = None,
) -> dict[str, Any]:
    """Column values of a ``structures`` row for ``atoms``."""
    return {
        "campaign_id": campaign_id,
        "hash": hash_ or atoms_hash(atoms),
        "numbers": atoms.numbers,
        "positions": atoms.positions,
        "cell": atoms.cell.array,
        "pbc": pbc_string(atoms.pbc),
        "n_atoms": len(atoms),
        "formula": hill_formula(atoms.numbers),
        "source": StructureSource(source).value,
        "parent_id": parent_id,
        "info": info if info is not None else json_scalars(atoms.info),
    }


# The ids of existing structures on PostgreSQL: one probe of the (campaign_id, hash) unique
# index per hash, whatever the statistics say. `hash IN (...)` let the planner, with
# statistics from before a large import committed (autovacuum had not analysed it yet),
# scan the whole campaign through the index's campaign_id prefix and filter the hashes:
# measured at 40,000 structures, "Rows Removed by Filter: 38000" for a batch of 2,000,
# which made a re-import quadratic.
PG_ID_LOOKUP = text(
    "SELECT s.id, h.hash FROM unnest(CAST(:hashes AS varchar[])) AS h(hash) "
    "CROSS JOIN LATERAL (SELECT id FROM structures "
    "WHERE campaign_id = :campaign_id AND hash = h.hash LIMIT 1) AS s")  # LIMIT: kept apart,
# not flattened into a join the planner could again cost from stale statistics


def upsert_structures(session: Session, rows: Sequence[dict[str, Any]]) -> tuple[list[int], int]:
    """Insert structure rows that are not there yet (by campaign × hash).

    Returns the ids of all rows, in order (existing ids for duplicates), and the number
    of rows that were new.
    """
    if not rows:
        return [], 0
    table = Structure.__table__
    unique: dict[tuple[int, str], dict[str, Any]] = {}
    now = _now()
    for row in rows:
        key = (row["campaign_id"], row["hash"])
        if key not in unique:
            unique[key] = row | {"created_at": now}
    # Rows go in input order so that ids follow file order. Concurrent writers of
    # overlapping rows in different orders can deadlock on PostgreSQL; run_transaction
    # retries the loser.
    ordered = list(unique.values())
    stmt = _insert(session, table).on_conflict_do_nothing(index_elements=["campaign_id", "hash"])
    ids: dict[tuple[int, str], int] = {}
    if session.get_bind().dialect.name == "sqlite":
        n_new = _execute_counting(session, stmt, table, ordered)
    else:  # the new rows' ids come back with the insert: only duplicates are looked up
        new = session.execute(stmt.returning(table.c.id, table.c.campaign_id, table.c.hash),
                              ordered).all()
        ids.update({(cid, h): i for i, cid, h in new})
        n_new = len(new)
    by_campaign: dict[int, list[str]] = {}
    for cid, h in unique:
        if (cid, h) not in ids:
            by_campaign.setdefault(cid, []).append(h)
    postgres = session.get_bind().dialect.name == "postgresql"
    for cid, hashes in by_campaign.items():
        for start in range(0, len(hashes), 5000):
            chunk = hashes[start : start + 5000]
            if postgres:
                found = session.execute(PG_ID_LOOKUP, {"campaign_id": cid, "hashes": chunk})
            else:
                found = session.execute(select(table.c.id, table.c.hash).where(
                    table.c.campaign_id == cid, table.c.hash.in_(chunk)))
            ids.update({(cid, h): i for i, h in found})
    return [ids[(r["campaign_id"], r["hash"])] for r in rows], n_new


def label_row(
    structure_id: int, record: LabelRecord, round_id: int | None = None
) -> dict[str, Any]:
    """Column values of a ``labels`` row, with derived energy per atom and max |F|."""
    status = LabelStatus(record.status).value
    forces = None if record.forces is None else np.asarray(record.forces, dtype=float)
    energy = None if record.energy is None else float(record.energy)
    if status == "ok" and (energy is None or forces is None):
        raise ValueError(f"an ok label needs energy and forces (structure {structure_id})")
    n_atoms = 0 if forces is None else len(forces)
    return {
        "structure_id": structure_id,
        "settings_hash": record.settings_hash,
        "labeler": record.labeler,
        "method": record.method,
        "basis": record.basis,
        "status": status,
        "energy": energy,
        "forces": forces,
        "energy_per_atom": energy / n_atoms if energy is not None and n_atoms else None,
        "max_force": float(np.sqrt((forces * forces).sum(1).max())) if n_atoms else None,
        "n_scf_cycles": record.n_scf_cycles,
        "wall_s": record.wall_s,
        "error": record.error,
        "provenance": record.provenance,
        "round_id": round_id,
    }


def upsert_labeler_settings(session: Session, records: Iterable[LabelRecord]) -> None:
    """Store each distinct settings hash of ``records`` once (first settings win)."""
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.settings_hash not in rows:
            rows[r.settings_hash] = {
                "settings_hash": r.settings_hash, "labeler": r.labeler, "method": r.method,
                "basis": r.basis, "settings": r.settings, "created_at": _now(),
            }
    if rows:
        table = LabelerSettings.__table__
        stmt = _insert(session, table).on_conflict_do_nothing(index_elements=["settings_hash"])
        session.execute(stmt, list(rows.values()))


_REPLACEABLE = (
    "labeler", "method", "basis", "status", "energy", "forces", "energy_per_atom",
    "max_force", "n_scf_cycles", "wall_s", "error", "provenance", "round_id", "created_at",
)


def upsert_labels(
    session: Session,
    items: Sequence[tuple[int, LabelRecord]],
    *,
    round_id: int | None = None,
    replace_failed: bool = False,
) -> int:
    """Store labels given as (structure id, record) pairs; returns how many were written.

    A (structure, settings-hash) pair already labelled is kept as it is. With
    ``replace_failed`` a stored label whose status is not ``ok`` is overwritten by the
    new one (a retry); an ``ok`` label is never overwritten.
    """
    if not items:
        return 0
    upsert_labeler_settings(session, (rec for _, rec in items))
    table = Label.__table__
    now = _now()
    sids = sorted({sid for sid, _ in items})
    campaign_of = dict(session.execute(select(Structure.id, Structure.campaign_id)
                                       .where(Structure.id.in_(sids))).all())
    unique: dict[tuple[int, str], dict[str, Any]] = {}
    for sid, rec in items:
        key = (sid, rec.settings_hash)
        if key not in unique:
            if sid not in campaign_of:
                raise ValueError(f"cannot label structure {sid}: no such structure")
            unique[key] = label_row(sid, rec, round_id) | {"created_at": now,
                                                            "campaign_id": campaign_of[sid]}
    stmt = _insert(session, table)
    keys = ["structure_id", "settings_hash"]
    if replace_failed:
        stmt = stmt.on_conflict_do_update(
            index_elements=keys,
            set_={c: stmt.excluded[c] for c in _REPLACEABLE},
            where=table.c.status != LabelStatus.OK.value,
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=keys)
    return _execute_counting(session, stmt, table, list(unique.values()))


# PostgreSQL SQLSTATEs worth retrying: serialization failure, deadlock detected.
_RETRYABLE = {"40001", "40P01"}


def run_transaction(
    engine: Engine, work: Callable[[Session], Any], *, retries: int = 5
) -> Any:
    """Run ``work(session)`` in one transaction, retried on deadlock/serialization errors
    and on SQLite's "database is locked"; anything else propagates after rollback."""
    for attempt in range(retries + 1):
        try:
            with session_scope(engine) as session:
                return work(session)
        except DBAPIError as exc:
            code = getattr(exc.orig, "sqlstate", None)
            locked = "database is locked" in str(exc.orig)
            if attempt == retries or not (code in _RETRYABLE or locked):
                raise
            log.warning("transaction conflict (%s), retry %d/%d", code or "locked",
                        attempt + 1, retries)
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")
