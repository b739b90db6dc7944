"""Writing structures and labels: bulk, idempotent, safe under concurrent writers.

Every writer here uses ``INSERT ... ON CONFLICT`` against the unique keys
(campaign × structure hash, structure × labeler-settings hash), so the same structure or
label arriving twice, from one process or several at once, is stored once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms
from sqlalchemy import Engine, Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from db.engine import session_scope
from db.identity import atoms_hash, pbc_string
from db.models import Campaign, Label, LabelStatus, Structure, StructureSource

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


def settings_hash(settings: dict[str, Any]) -> str:
    """sha256 of canonical JSON (sorted keys): the identity of labeler settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


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
        "formula": atoms.get_chemical_formula(mode="hill"),
        "source": StructureSource(source).value,
        "parent_id": parent_id,
        "info": info if info is not None else json_scalars(atoms.info),
    }


def upsert_structures(session: Session, rows: Sequence[dict[str, Any]]) -> tuple[list[int], int]:
    """Insert structure rows that are not there yet (by campaign × hash).

    Returns the ids of all rows, in order (existing ids for duplicates), and the number
    of rows that were new.
    """
    if not rows:
        return [], 0
    table = Structure.__table__
    unique: dict[tuple[int, str], dict[str, Any]] = {}
    for row in rows:
        unique.setdefault((row["campaign_id"], row["hash"]), row)
    # Rows go in input order so that ids follow file order. Concurrent writers of
    # overlapping rows in different orders can deadlock on PostgreSQL; run_transaction
    # retries the loser.
    ordered = list(unique.values())
    stmt = (
        _insert(session, table)
        .on_conflict_do_nothing(index_elements=["campaign_id", "hash"])
        .returning(table.c.id)
    )
    n_new = len(session.execute(stmt, ordered).all())
    ids: dict[tuple[int, str], int] = {}
    by_campaign: dict[int, list[str]] = {}
    for cid, h in unique:
        by_campaign.setdefault(cid, []).append(h)
    for cid, hashes in by_campaign.items():
        for start in range(0, len(hashes), 5000):
            chunk = hashes[start : start + 5000]
            q = select(table.c.id, table.c.hash).where(
                table.c.campaign_id == cid, table.c.hash.in_(chunk)
            )
            ids.update({(cid, h): i for i, h in session.execute(q)})
    return [ids[(r["campaign_id"], r["hash"])] for r in rows], n_new


def label_row(
    structure_id: int, record: LabelRecord, round_id: int | None = None
) -> dict[str, Any]:
    """Column values of a ``labels`` row, with derived energy per atom and max |F|."""
    status = LabelStatus(record.status).value
    forces = None if record.forces is None else np.asarray(record.forces, dtype=float)
    energy = None if record.energy is None else float(record.energy)
    if status == LabelStatus.OK.value and (energy is None or forces is None):
        raise ValueError(f"an ok label needs energy and forces (structure {structure_id})")
    n_atoms = None if forces is None else forces.shape[0]
    return {
        "structure_id": structure_id,
        "settings_hash": record.settings_hash,
        "labeler": record.labeler,
        "method": record.method,
        "basis": record.basis,
        "settings": record.settings,
        "status": status,
        "energy": energy,
        "forces": forces,
        "energy_per_atom": energy / n_atoms if energy is not None and n_atoms else None,
        "max_force": float(np.linalg.norm(forces, axis=1).max()) if n_atoms else None,
        "n_scf_cycles": record.n_scf_cycles,
        "wall_s": record.wall_s,
        "error": record.error,
        "provenance": record.provenance,
        "round_id": round_id,
    }


_REPLACEABLE = (
    "labeler", "method", "basis", "settings", "status", "energy", "forces", "energy_per_atom",
    "max_force", "n_scf_cycles", "wall_s", "error", "provenance", "round_id", "created_at",
)


def upsert_labels(
    session: Session, rows: Sequence[dict[str, Any]], *, replace_failed: bool = False
) -> int:
    """Insert label rows; a (structure, settings-hash) pair already labelled is kept.

    With ``replace_failed`` a stored label whose status is not ``ok`` is overwritten by the
    new row (a retry); an ``ok`` label is never overwritten. Returns rows written.
    """
    if not rows:
        return 0
    table = Label.__table__
    unique: dict[tuple[int, str], dict[str, Any]] = {}
    for row in rows:
        unique.setdefault((row["structure_id"], row["settings_hash"]), row)
    ordered = list(unique.values())
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
    return len(session.execute(stmt.returning(table.c.id), ordered).all())


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
