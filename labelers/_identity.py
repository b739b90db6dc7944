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


def spin_problem(atoms: Atoms, charge: int, multiplicity: int) -> str | None:
    """Why ``charge`` and ``multiplicity`` (2S+1) are impossible for ``atoms``, or ``None``.

    Core shells hold an even number of electrons, so the parity of all electrons is that of
    the valence electrons too: the check holds for all-electron and valence-only methods
    (PySCF, xTB) alike.
    """
    n_electrons = int(atoms.numbers.sum()) - int(charge)
    unpaired = int(multiplicity) - 1
    if n_electrons <= 0:
        return f"charge {charge} leaves {n_electrons} electrons"
    if (n_electrons - unpaired) % 2 or unpaired > n_electrons:
        fix = "an even multiplicity (2, 4, ...)" if n_electrons % 2 else \
              "an odd multiplicity (1, 3, ...)"
        return (f"{n_electrons} electrons (charge {charge}) cannot have multiplicity "
                f"{multiplicity}; use {fix} or another charge")
    return None
