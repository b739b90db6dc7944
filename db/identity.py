"""Structure identity and geometric sanity checks of many structures at once.

A structure's identity (``structure_hash``, ``atoms_hash``) and the minimum distance are
contracts defined in :mod:`bayesal.contracts`, re-exported here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from ase import Atoms

from bayesal.contracts import (
    MIN_DISTANCE,
    ROUND_ANGSTROM,
    atoms_hash,
    closest_pair,
    pbc_flags,
    structure_hash,
)

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

@functools.lru_cache(maxsize=4096)
def _formula(numbers: bytes) -> str:
    return Atoms(numbers=np.frombuffer(numbers, dtype=np.int64)).get_chemical_formula("hill")


def hill_formula(numbers: np.ndarray) -> str:
    """Hill formula (C, H, then alphabetical), cached per composition and order."""
    return _formula(np.asarray(numbers, dtype=np.int64).tobytes())


def pbc_string(pbc) -> str:
    """Periodic flags as a 3-character string, e.g. ``"FFF"``."""
    return "".join("T" if p else "F" for p in pbc_flags(pbc))


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
