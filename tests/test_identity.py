from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk, molecule

from bayesal.db.identity import atoms_hash, closest_pair


def test_hash_ignores_noise_below_resolution_and_sees_real_changes():
    a = molecule("CH3CH2OH")
    b = a.copy()
    b.positions += 1e-9
    assert atoms_hash(a) == atoms_hash(b)
    c = a.copy()
    c.positions[0, 0] += 1e-5
    assert atoms_hash(a) != atoms_hash(c)


def test_hash_depends_on_species_cell_and_pbc():
    a = molecule("H2O")
    b = a.copy()
    b.numbers[0] = 9
    assert atoms_hash(a) != atoms_hash(b)
    c = a.copy()
    c.cell = [10, 10, 10]
    assert atoms_hash(a) != atoms_hash(c)
    d = c.copy()
    d.pbc = True
    assert atoms_hash(c) != atoms_hash(d)


def test_hash_is_pinned():
    # Changing the hash definition would silently split every existing campaign in two.
    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    assert atoms_hash(atoms) == "ef4260df02e73c9a5851c8089c7566f404e24b50d6e8e50ea3403c007819afe8"


def test_closest_pair_molecule_and_periodic_image():
    mol = Atoms("H3", positions=[[0, 0, 0], [0, 0, 0.05], [0, 0, 3]], cell=[50, 50, 50])
    i, j, d = closest_pair(mol)
    assert {i, j} == {0, 1} and abs(d - 0.05) < 1e-12
    assert closest_pair(molecule("CH3CH2OH")) is None
    # Two atoms close only through the periodic boundary.
    cell = Atoms("H2", positions=[[0.02, 0, 0], [9.95, 0, 0]], cell=[10, 10, 10], pbc=True)
    i, j, d = closest_pair(cell)
    assert abs(d - 0.07) < 1e-9
    assert closest_pair(bulk("Cu", cubic=True).repeat(3)) is None
    assert np.isfinite(closest_pair(cell)[2])
