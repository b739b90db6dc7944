"""Structure identity and geometric sanity checks.

A structure's identity is the sha256 of its atomic numbers, its positions rounded to
1e-6 Å, its cell rounded to 1e-6 Å and its periodic flags: the same structure imported
twice (from any file, in any campaign) has the same hash.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import numpy as np
from ase import Atoms

__all__ = [
    "MIN_DISTANCE",
    "ROUND_ANGSTROM",
    "atoms_hash",
    "closest_pair",
    "closest_pairs",
    "hill_formula",
    "pbc_string",
    "structure_hash",
]

ROUND_ANGSTROM = 1e-6  # Å, resolution of the identity hash
MIN_DISTANCE = 0.1  # Å, atoms closer than this are a broken structure


def _flags(pbc) -> tuple[bool, bool, bool]:
    if isinstance(pbc, np.ndarray) and pbc.shape == (3,):
        return tuple(pbc.tolist())
    if isinstance(pbc, bool | np.bool_):
        return (bool(pbc),) * 3
    a, b, c = pbc
    return bool(a), bool(b), bool(c)


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
    h = hashlib.sha256(np.asarray(numbers).astype("<i8", copy=False).tobytes())
    h.update(np.rint(np.asarray(positions, dtype=float) / ROUND_ANGSTROM).astype("<i8").tobytes())
    h.update(np.rint(np.asarray(cell, dtype=float) / ROUND_ANGSTROM).astype("<i8").tobytes())
    h.update(bytes(_flags(pbc)))
    return h.hexdigest()


def atoms_hash(atoms: Atoms) -> str:
    """:func:`structure_hash` of an ASE ``Atoms``."""
    return structure_hash(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)


@functools.lru_cache(maxsize=4096)
def _formula(numbers: bytes) -> str:
    return Atoms(numbers=np.frombuffer(numbers, dtype=np.int64)).get_chemical_formula("hill")


def hill_formula(numbers: np.ndarray) -> str:
    """Hill formula (C, H, then alphabetical), cached per composition and order."""
    return _formula(np.asarray(numbers, dtype=np.int64).tobytes())


def pbc_string(pbc) -> str:
    """Periodic flags as a 3-character string, e.g. ``"FFF"``."""
    return "".join("T" if p else "F" for p in _flags(pbc))


def closest_pair(atoms: Atoms, cutoff: float = MIN_DISTANCE) -> tuple[int, int, float] | None:
    """The closest pair of atoms nearer than ``cutoff`` Å (minimum image), or ``None``.

    Molecules (no periodic direction) use a k-d tree; periodic cells use ASE's cell-list
    neighbour search with bins of at least 1 Å (bins of ``cutoff`` = 0.1 Å would number
    millions in a large box).
    """
    if not atoms.pbc.any():
        n = len(atoms)
        if n < 2:
            return None
        if n <= 64:  # small molecules: all pairs in numpy beat building a tree
            pos = atoms.positions
            d2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
            d2[np.diag_indices(n)] = np.inf
            k = int(np.argmin(d2))
            d = float(np.sqrt(d2.flat[k]))
            return (k // n, k % n, d) if d < cutoff else None
        from scipy.spatial import cKDTree  # lazy: scipy costs half a second to import

        dist, idx = cKDTree(atoms.positions).query(atoms.positions, k=2)
        i = int(np.argmin(dist[:, 1]))
        d = float(dist[i, 1])
        return (i, int(idx[i, 1]), d) if d < cutoff else None
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijd", atoms, max(cutoff, 1.0))
    close = d < cutoff
    if not close.any():
        return None
    k = int(np.flatnonzero(close)[np.argmin(d[close])])
    return int(i[k]), int(j[k]), float(d[k])


def closest_pairs(
    images: Sequence[Atoms], cutoff: float = MIN_DISTANCE
) -> list[tuple[int, int, float] | None]:
    """:func:`closest_pair` of many structures at once.

    Small molecules of equal size are stacked and checked in one numpy operation, which is
    what makes validating large imports cheap; everything else goes one by one.
    """
    out: list[tuple[int, int, float] | None] = [None] * len(images)
    groups: dict[int, list[int]] = {}
    for k, atoms in enumerate(images):
        n = len(atoms)
        if 2 <= n <= 64 and not atoms.pbc.any():
            groups.setdefault(n, []).append(k)
        else:
            out[k] = closest_pair(atoms, cutoff)
    for n, ks in groups.items():
        step = max(1, 2_000_000 // (3 * n * n))  # bounded memory per chunk
        diag = np.arange(n)
        for start in range(0, len(ks), step):
            chunk = ks[start : start + step]
            pos = np.stack([images[k].positions for k in chunk])  # (B, n, 3)
            d2 = ((pos[:, :, None, :] - pos[:, None, :, :]) ** 2).sum(-1)  # (B, n, n)
            d2[:, diag, diag] = np.inf
            flat = d2.reshape(len(chunk), -1)
            arg = flat.argmin(axis=1)
            dmin = np.sqrt(flat[np.arange(len(chunk)), arg])
            for b in np.flatnonzero(dmin < cutoff):
                out[chunk[b]] = (int(arg[b] // n), int(arg[b] % n), float(dmin[b]))
    return out
