"""Structure identity and geometry checks for labelers.

``structure_key`` is the same definition as ``db.identity.structure_hash`` (sha256 of atomic
numbers, positions and cell rounded to 1e-6 Å, and pbc); labelers cannot import db/, and a
test keeps the two equal.
"""

from __future__ import annotations

import hashlib

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list

MIN_DISTANCE = 0.1  # Å


def structure_key(atoms: Atoms) -> str:
    """Canonical sha256 hex digest of a structure (see module docstring)."""
    h = hashlib.sha256(np.asarray(atoms.numbers).astype("<i8", copy=False).tobytes())
    h.update(np.rint(np.asarray(atoms.positions, dtype=float) / 1e-6).astype("<i8").tobytes())
    h.update(np.rint(np.asarray(atoms.cell.array, dtype=float) / 1e-6).astype("<i8").tobytes())
    h.update(bytes(bool(p) for p in atoms.pbc))
    return h.hexdigest()


def geometry_problem(atoms: Atoms) -> str | None:
    """What is physically wrong with a geometry, or ``None``: empty, NaN/inf, atoms < 0.1 Å."""
    if len(atoms) == 0:
        return "the structure has no atoms"
    if not np.isfinite(atoms.positions).all():
        bad = int(np.flatnonzero(~np.isfinite(atoms.positions).all(axis=1))[0])
        return f"non-finite (NaN/inf) position at atom {bad}"
    if len(atoms) < 2:
        return None
    if atoms.pbc.any():
        i, j, d = neighbor_list("ijd", atoms, 1.0)
        close = d < MIN_DISTANCE
        if close.any():
            k = int(np.flatnonzero(close)[0])
            return f"atoms {i[k]} and {j[k]} are {d[k]:.4f} Å apart (< {MIN_DISTANCE} Å)"
        return None
    pos = atoms.positions
    d2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    d2[np.diag_indices(len(atoms))] = np.inf
    k = int(np.argmin(d2))
    d = float(np.sqrt(d2.flat[k]))
    if d < MIN_DISTANCE:
        return f"atoms {k // len(atoms)} and {k % len(atoms)} are {d:.4f} Å apart " \
               f"(< {MIN_DISTANCE} Å)"
    return None
