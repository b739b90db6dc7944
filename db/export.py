"""`bayesal export`: labelled data out as extxyz (MACE/NequIP-ready), CSV or Parquet."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase.data import chemical_symbols
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from bayesal.db.engine import DatabaseError, readonly_session
from bayesal.db.identity import pbc_string
from bayesal.db.ingest import get_campaign
from bayesal.db.models import Label, LabelStatus, Round, Structure

__all__ = ["EXPORT_FORMATS", "ExportReport", "atoms_extxyz", "csv_safe", "export_campaign",
           "format_extxyz", "label_levels"]

EXPORT_FORMATS = ("extxyz", "csv", "parquet")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value):
    """A CSV cell a spreadsheet will not run: text starting with = + - @ (a formula in
    Excel/LibreOffice) gets a leading ' (OWASP's advice); numbers and other text unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


@dataclass
class ExportReport:
    path: Path
    n_structures: int
    settings_hash: str | None


def label_levels(session: Session, campaign_id: int) -> list[dict[str, Any]]:
    """Distinct labeler settings of a campaign's ok labels, most used first."""
    q = (
        select(Label.settings_hash, Label.labeler, Label.method, Label.basis,
               func.count().label("n"), func.max(Label.id).label("newest"))
        .join(Structure, Structure.id == Label.structure_id)
        .where(Structure.campaign_id == campaign_id, Label.status == LabelStatus.OK.value)
        .group_by(Label.settings_hash, Label.labeler, Label.method, Label.basis)
        .order_by(func.count().desc())
    )
    return [row._asdict() for row in session.execute(q)]


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "._-+:/" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _info_value(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "fiu":
        return '"' + " ".join(repr(float(x)) for x in value) + '"'  # ASE reads an array
    return _quote(str(value))


def format_extxyz(
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: str,
    info: dict[str, Any],
    arrays: dict[str, np.ndarray],
) -> str:
    """One extended-XYZ frame with every float written at full precision (repr).

    ASE's own writer rounds to 8 decimals; this one round-trips floats exactly and is
    read back by ``ase.io.read`` (and therefore by MACE and NequIP).
    """
    props = ["species:S:1", "pos:R:3"]
    for key, arr in arrays.items():
        props.append(f"{key}:R:{arr.shape[1]}")
    header = []
    if np.any(cell):
        header.append('Lattice="' + " ".join(repr(x) for x in cell.reshape(-1).tolist()) + '"')
    header.append("Properties=" + ":".join(props))
    header.extend(f"{k}={_info_value(v)}" for k, v in info.items() if v is not None)
    header.append('pbc="' + " ".join(pbc) + '"')
    columns = [positions, *arrays.values()]
    table = np.hstack([np.asarray(c, dtype=float).reshape(len(numbers), -1) for c in columns])
    lines = [str(len(numbers)), " ".join(header)]
    for z, row in zip(numbers.tolist(), table.tolist(), strict=True):
        lines.append(chemical_symbols[z] + " " + " ".join(repr(x) for x in row))
    return "\n".join(lines) + "\n"


def atoms_extxyz(atoms, info: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    """:func:`format_extxyz` of an ASE ``Atoms`` (its numbers, positions, cell and periodic
    flags) with ``info`` and per-atom ``arrays``: what the CLI commands write."""
    return format_extxyz(atoms.numbers, atoms.positions, atoms.cell.array,
                         pbc_string(atoms.pbc), info, arrays)


def _choose_level(levels: list[dict[str, Any]], requested: str | None, campaign: str) -> str | None:
    """The settings hash to export: the only one, the one a (prefix) request names, or with
    ``latest`` the one of the campaign's newest ok label."""
    if requested == "latest":
        return max(levels, key=lambda lv: lv["newest"])["settings_hash"] if levels else None
    if requested is None:
        if len(levels) <= 1:
            return levels[0]["settings_hash"] if levels else None
        listing = "\n".join(
            f"  {lv['settings_hash'][:16]}  {lv['labeler']} "
            f"{'/'.join(x for x in (lv['method'], lv['basis']) if x) or '(no method name)'}"
            f"  ({lv['n']} labels)" for lv in levels)
        raise DatabaseError(
            f"campaign {campaign!r} has labels at {len(levels)} levels of theory; "
            f"choose one with --labeler-settings HASH (a unique prefix is enough) or "
            f"--labeler-settings latest:\n{listing}")
    matches = [lv["settings_hash"] for lv in levels if lv["settings_hash"].startswith(requested)]
    if len(matches) != 1:
        raise DatabaseError(f"--labeler-settings {requested!r} matches {len(matches)} of the "
                            "campaign's label settings; give a longer prefix, or latest")
    return matches[0]


def _rows(session: Session, campaign_id: int, chosen: str | None,
          include_unlabelled: bool) -> Iterator[Any]:
    label_join = and_(Label.structure_id == Structure.id, Label.settings_hash == chosen,
                      Label.status == LabelStatus.OK.value)
    q = (
        select(Structure, Label, Round.round_index)
        .join(Label, label_join, isouter=include_unlabelled)
        .join(Round, Round.id == Label.round_id, isouter=True)
        .where(Structure.campaign_id == campaign_id)
        .order_by(Structure.id)
        .execution_options(yield_per=1000)
    )
    yield from session.execute(q)


def export_campaign(
    url: str,
    campaign: str,
    path: str | Path,
    fmt: str = "extxyz",
    *,
    settings_hash: str | None = None,
    include_unlabelled: bool = False,
    energy_key: str = "REF_energy",
    forces_key: str = "REF_forces",
    on_row: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> ExportReport:
    """Write a campaign's structures with their ok labels (one labeler setting) to a file.

    Reads through a read-only engine. ``energy_key``/``forces_key`` name the extxyz info and
    array keys (MACE's ``REF_*`` defaults; NequIP reads them via ``key_mapping``).
    ``on_total`` gets the number of structures about to be written, ``on_row`` the number
    written so far.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    path = Path(path)
    with readonly_session(url) as session:
        camp = get_campaign(session, campaign)
        if camp is None:
            raise DatabaseError(f"no campaign named {campaign!r} in the database")
        levels = label_levels(session, camp.id)
        chosen = _choose_level(levels, settings_hash, campaign)
        if on_total is not None:  # how many rows the export writes (a progress bar's total)
            if include_unlabelled:
                on_total(session.scalar(select(func.count()).select_from(Structure)
                                        .where(Structure.campaign_id == camp.id)))
            else:
                on_total(next((lv["n"] for lv in levels if lv["settings_hash"] == chosen), 0))
        rows = _rows(session, camp.id, chosen, include_unlabelled)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        if fmt == "extxyz":
            n = _write_extxyz(rows, tmp, energy_key, forces_key, on_row)
        else:
            n = _write_table(rows, tmp, fmt, campaign, on_row)
        tmp.replace(path)  # never leave a half-written export under the final name
    return ExportReport(path=path, n_structures=n, settings_hash=chosen)


def _write_extxyz(rows, path: Path, energy_key: str, forces_key: str, on_row) -> int:
    n = 0
    with open(path, "w") as fh:
        for s, label, round_index in rows:
            info: dict[str, Any] = dict(s.info)
            info.update(structure_id=s.id, structure_hash=s.hash, source=s.source)
            arrays = {}
            if label is not None:
                info[energy_key] = label.energy
                info.update(label_id=label.id, settings_hash=label.settings_hash)
                if round_index is not None:
                    info["round_index"] = round_index
                arrays[forces_key] = label.forces
            fh.write(format_extxyz(s.numbers, s.positions, s.cell, s.pbc, info, arrays))
            n += 1
            if on_row is not None:
                on_row(n)
    return n


def _record(s, label, round_index, campaign: str) -> dict[str, Any]:
    ok = label is not None
    return {
        "campaign": campaign, "structure_id": s.id, "structure_hash": s.hash,
        "formula": s.formula, "n_atoms": s.n_atoms, "source": s.source, "pbc": s.pbc,
        "round_index": round_index, "label_id": label.id if ok else None,
        "labeler": label.labeler if ok else None, "method": label.method if ok else None,
        "basis": label.basis if ok else None,
        "settings_hash": label.settings_hash if ok else None,
        "energy": label.energy if ok else None,
        "energy_per_atom": label.energy_per_atom if ok else None,
        "max_force": label.max_force if ok else None,
        "numbers": s.numbers.tolist(), "positions": s.positions.tolist(),
        "cell": s.cell.tolist(), "forces": label.forces.tolist() if ok else None,
    }


def _parquet_schema():
    import pyarrow as pa

    vec = pa.list_(pa.list_(pa.float64()))
    return pa.schema([
        ("campaign", pa.string()), ("structure_id", pa.int64()), ("structure_hash", pa.string()),
        ("formula", pa.string()), ("n_atoms", pa.int64()), ("source", pa.string()),
        ("pbc", pa.string()), ("round_index", pa.int64()), ("label_id", pa.int64()),
        ("labeler", pa.string()), ("method", pa.string()), ("basis", pa.string()),
        ("settings_hash", pa.string()), ("energy", pa.float64()),
        ("energy_per_atom", pa.float64()), ("max_force", pa.float64()),
        ("numbers", pa.list_(pa.int64())), ("positions", vec), ("cell", vec), ("forces", vec),
    ])


def _write_table(rows, path: Path, fmt: str, campaign: str, on_row, chunk: int = 2000) -> int:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _parquet_schema()
    n, buf = 0, []
    writer = pq.ParquetWriter(path, schema) if fmt == "parquet" else None

    def flush(first: bool) -> None:
        if writer is not None:
            writer.write_table(pa.Table.from_pylist(buf, schema=schema))
        else:  # CSV: nested arrays as JSON text
            df = pd.DataFrame.from_records(buf, columns=schema.names)
            for col in ("numbers", "positions", "cell", "forces"):
                df[col] = [None if v is None else json.dumps(v) for v in df[col]]
            for col in df.columns:  # every text column (object in pandas 2, str in 3)
                if not pd.api.types.is_numeric_dtype(df[col]):
                    df[col] = [csv_safe(v) for v in df[col]]
            df.to_csv(path, mode="w" if first else "a", header=first, index=False)
        buf.clear()

    first = True
    try:
        for s, label, round_index in rows:
            buf.append(_record(s, label, round_index, campaign))
            n += 1
            if on_row is not None:
                on_row(n)
            if len(buf) >= chunk:
                flush(first)
                first = False
        if buf or first:
            flush(first)
    finally:
        if writer is not None:
            writer.close()
    return n
