"""Physics of the untrained potential, in float64: symmetries, forces = -dE/dr, batching."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from helpers import perturbed_model, predict_float64
from scipy.spatial.transform import Rotation

from bayesal.bayes_model.data import atoms_to_graph
from bayesal.bayes_model.model import ModelConfig

SPECIES = [1, 6, 8]
CFG = ModelConfig(channels=8, n_layers=3, l_max=2, radial_hidden=16, cutoff=4.0)


@pytest.fixture(scope="module")
def model():
    return perturbed_model(CFG, SPECIES, seed=0, scale=1.3, avg_neighbors=6.0)


predict = predict_float64


def ethanol(seed=0):
    atoms = molecule("CH3CH2OH")
    atoms.positions += np.random.default_rng(seed).normal(scale=0.1, size=atoms.positions.shape)
    return atoms


@pytest.mark.parametrize("reflect", [False, True])
def test_energy_invariant_forces_and_covariances_equivariant(model, reflect):
    atoms = ethanol()
    rot = Rotation.random(random_state=11).as_matrix()
    if reflect:
        rot = -rot  # improper rotation: rotation times inversion
    moved = atoms.copy()
    moved.positions = atoms.positions @ rot.T + np.array([3.0, -1.0, 2.0])
    a, b = predict(model, [atoms]), predict(model, [moved])
    assert abs(a["energy"][0] - b["energy"][0]) < 1e-9
    assert abs(a["energy_var"][0] - b["energy_var"][0]) < 1e-12
    np.testing.assert_allclose(b["forces"], a["forces"] @ rot.T, atol=1e-9)
    expected = np.einsum("ij,njk,lk->nil", rot, a["forces_cov"], rot)
    np.testing.assert_allclose(b["forces_cov"], expected, atol=1e-10)
    assert np.abs(a["forces_cov"] - a["forces_cov"][:, :1, :1] * np.eye(3)).max() > 1e-4, \
        "covariances should not be trivially isotropic"


def test_permutation_invariance(model):
    atoms = ethanol(1)
    perm = np.random.default_rng(2).permutation(len(atoms))
    a, b = predict(model, [atoms]), predict(model, [atoms[perm]])
    assert abs(a["energy"][0] - b["energy"][0]) < 1e-9
    np.testing.assert_allclose(b["forces"], a["forces"][perm], atol=1e-10)
    np.testing.assert_allclose(b["forces_cov"], a["forces_cov"][perm], atol=1e-12)


def test_forces_are_minus_gradient_by_finite_differences(model):
    atoms = ethanol(3)
    ref = predict(model, [atoms])
    h = 1e-5
    for a, c in [(0, 0), (2, 1), (5, 2), (8, 0)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[a, c] += h
        minus.positions[a, c] -= h
        e = predict(model, [plus, minus])["energy"]
        fd = -(e[0] - e[1]) / (2 * h)
        assert abs(fd - ref["forces"][a, c]) < 1e-7, (a, c, fd, ref["forces"][a, c])


def test_batching_gives_the_same_numbers(model):
    images = [ethanol(4), molecule("H2O"), ethanol(5), Atoms("CO", positions=[[0, 0, 0],
                                                                              [0, 0, 1.13]])]
    together = predict(model, images)
    start = 0
    for k, atoms in enumerate(images):
        alone = predict(model, [atoms])
        n = len(atoms)
        assert abs(together["energy"][k] - alone["energy"][0]) < 1e-10
        assert abs(together["energy_var"][k] - alone["energy_var"][0]) < 1e-12
        np.testing.assert_allclose(together["forces"][start:start + n], alone["forces"],
                                   atol=1e-10)
        np.testing.assert_allclose(together["forces_cov"][start:start + n],
                                   alone["forces_cov"], atol=1e-12)
        start += n


def test_covariances_are_symmetric_positive_definite(model):
    rng = np.random.default_rng(6)
    images = []
    for k in range(5):
        atoms = ethanol(10 + k)
        atoms.positions += rng.normal(scale=0.3, size=atoms.positions.shape)
        images.append(atoms)
    cov = predict(model, images)["forces_cov"]
    np.testing.assert_allclose(cov, cov.transpose(0, 2, 1), atol=1e-12)
    assert np.linalg.eigvalsh(cov).min() > 0
    assert (predict(model, images)["energy_var"] > 0).all()


def test_isolated_atom_feels_no_force(model):
    out = predict(model, [Atoms("O", positions=[[0, 0, 0]])])
    # no neighbours, no dependence on position
    np.testing.assert_allclose(out["forces"], 0.0, atol=1e-12)


def test_periodic_images_enter_the_graph():
    from ase.build import bulk

    diamond = bulk("C", "diamond", a=3.57)
    g = atoms_to_graph(diamond, [6], cutoff=2.0, with_labels=False)
    assert g.edge_index.shape[1] == 2 * 4  # 4 nearest neighbours per atom, via images
    d = np.linalg.norm(g.positions[g.edge_index[1]] - g.positions[g.edge_index[0]]
                       + g.edge_shift, axis=1)
    np.testing.assert_allclose(d, 3.57 * np.sqrt(3) / 4, atol=1e-9)
