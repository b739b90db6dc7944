"""Structure identity and geometric sanity checks.

A structure's identity is the sha256 of its atomic numbers, its positions rounded to
1e-6 Å, its cell rounded to 1e-6 Å and its periodic flags: the same structure imported
twice (from any file, in any campaign) has the same hash.
"""

from __future__ import annotations

import hashlib

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list
from scipy.spatial import cKDTree

__all__ = [
    "MIN_DISTANCE",
    "ROUND_ANGSTROM",
    "atoms_hash",
    "closest_pair",
    "pbc_string",
    "structure_hash",
]

ROUND_ANGSTROM = 1e-6  # Å, resolution of the identity hash
MIN_DISTANCE = 0.1  # Å, atoms closer than this are a broken structure


def structure_hash(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray, pbc) -> str:
    """Canonical sha256 hex digest of a structure.

    Parameters
    ----------
    numbers
        (n_atoms,) atomic numbers.
    positions
        (n_atoms, 3) Cartesian positions, Å.
    cell
        (3, 3) lattice vectors as rows, Å (zeros for none).
    pbc
        Three periodic flags.
    """
    h = hashlib.sha256()
    h.update(np.asarray(numbers, dtype="<i8").tobytes())
    h.update(np.rint(np.asarray(positions, dtype=float) / ROUND_ANGSTROM).astype("<i8").tobytes())
    h.update(np.rint(np.asarray(cell, dtype=float) / ROUND_ANGSTROM).astype("<i8").tobytes())
    h.update(bytes(bool(p) for p in np.broadcast_to(pbc, 3)))
    return h.hexdigest()


def atoms_hash(atoms: Atoms) -> str:
    """:func:`structure_hash` of an ASE ``Atoms``."""
    return structure_hash(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)


def pbc_string(pbc) -> str:
    """Periodic flags as a 3-character string, e.g. ``"FFF"``."""
    return "".join("T" if p else "F" for p in np.broadcast_to(pbc, 3))


def closest_pair(atoms: Atoms, cutoff: float = MIN_DISTANCE) -> tuple[int, int, float] | None:
    """The closest pair of atoms nearer than ``cutoff`` Å (minimum image), or ``None``.

    Molecules (no periodic direction) use a k-d tree; periodic cells use ASE's cell-list
    neighbour search with bins of at least 1 Å (bins of ``cutoff`` = 0.1 Å would number
    millions in a large box).
    """
    if not atoms.pbc.any():
        if len(atoms) < 2:
            return None
        dist, idx = cKDTree(atoms.positions).query(atoms.positions, k=2)
        i = int(np.argmin(dist[:, 1]))
        d = float(dist[i, 1])
        return (i, int(idx[i, 1]), d) if d < cutoff else None
    i, j, d = neighbor_list("ijd", atoms, max(cutoff, 1.0))
    close = d < cutoff
    if not close.any():
        return None
    k = int(np.flatnonzero(close)[np.argmin(d[close])])
    return int(i[k]), int(j[k]), float(d[k])
