"""Geometry checks for labelers (structure identity is ``bayesal.contracts.atoms_hash``,
the database's own)."""

from __future__ import annotations

import numpy as np
from ase import Atoms

from bayesal.contracts import MIN_DISTANCE, closest_pair


def geometry_problem(atoms: Atoms) -> str | None:
    """What is physically wrong with a geometry, or ``None``: empty, NaN/inf, atoms < 0.1 Å."""
    if len(atoms) == 0:
        return "the structure has no atoms"
    if not np.isfinite(atoms.positions).all():
        bad = int(np.flatnonzero(~np.isfinite(atoms.positions).all(axis=1))[0])
        return f"non-finite (NaN/inf) position at atom {bad}"
    pair = closest_pair(atoms, MIN_DISTANCE)
    if pair is not None:
        i, j, d = pair
        return f"atoms {i} and {j} are {d:.4f} Å apart (< {MIN_DISTANCE} Å)"
    return None
