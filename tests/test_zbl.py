"""The ZBL repulsion (``model.zbl``): the screened nuclear repulsion of pairs closer than
their covalent radii's sum, added to the network's energy, part of a potential that still
obeys the physics (forces = −∂E/∂r, symmetries, stress = (1/V) ∂E/∂ε)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.data import covalent_radii
from helpers import TINY, perturbed_model, predict_float64

from bayesal.bayes_model.model import ModelConfig


def _pair(zbl: bool, species=(1, 6, 8)):
    """The same perturbed float64 potential with and without the ZBL term."""
    return perturbed_model(ModelConfig(**TINY, zbl=zbl), list(species), seed=3, scale=1.0,
                           avg_neighbors=4.0)


def _zbl_reference(r: float, z1: int, z2: int, p: int = 6) -> float:
    """ZBL (Ziegler, Biersack & Littmark 1985) with its universal screening length and
    function, switched off by u(r / (r_cov,1 + r_cov,2)), in numpy."""
    a = 0.8854 * 0.529177210903 / (z1**0.23 + z2**0.23)
    x = r / a
    phi = (0.18175 * np.exp(-3.19980 * x) + 0.50986 * np.exp(-0.94229 * x)
           + 0.28022 * np.exp(-0.40290 * x) + 0.02817 * np.exp(-0.20162 * x))
    d = r / (covalent_radii[z1] + covalent_radii[z2])
    u = (1 - (p + 1) * (p + 2) / 2 * d**p + p * (p + 2) * d ** (p + 1)
         - p * (p + 1) / 2 * d ** (p + 2)) if d < 1 else 0.0
    return 14.399645 * z1 * z2 / r * phi * u


@pytest.mark.parametrize(("symbols", "r"), [("CC", 0.6), ("CC", 1.2), ("CO", 1.0),
                                            ("HH", 0.3), ("CH", 0.9), ("CC", 1.6),
                                            ("HO", 1.5)])
def test_a_dimer_gains_the_zbl_energy_of_its_pair_and_nothing_beyond_the_radii(symbols, r):
    """E(zbl) − E(network alone) is the pair's ZBL energy, once (not once per edge
    direction); zero at and beyond the covalent radii's sum (C-C 1.52 Å, H-O 0.97 Å)."""
    dimer = Atoms(symbols, positions=[[0, 0, 0], [0, 0, r]])
    gain = (predict_float64(_pair(True), [dimer])["energy"][0]
            - predict_float64(_pair(False), [dimer])["energy"][0])
    z1, z2 = dimer.numbers
    assert gain == pytest.approx(_zbl_reference(r, z1, z2), rel=1e-9, abs=1e-12)
    if r >= covalent_radii[z1] + covalent_radii[z2]:
        assert gain == 0.0
    else:
        assert gain > 0.0


def test_the_wall_rises_steeply_as_atoms_are_pushed_together():
    """C-C: about 0.6 eV at 1.3 Å, tens of eV at 0.8 Å, hundreds at 0.4 Å."""
    energies = [_zbl_reference(r, 6, 6) for r in (1.3, 0.8, 0.4)]
    assert 0.01 < energies[0] < 1 < 10 < energies[1] < 100 < energies[2]
    assert energies == sorted(energies)


def test_a_potential_with_zbl_obeys_the_physics():
    """A compressed molecule (every pair inside the wall) and a periodic cell: forces are
    −∂E/∂r, energies invariant and forces equivariant under rotation, stress is the strain
    derivative, with the ZBL term contributing."""
    from helpers import assert_prediction_physics
    from test_periodic import numerical_stress

    from bayesal.bayes_model.posterior import EnsemblePosterior

    model = _pair(True)
    water_like = Atoms("COH2", positions=[[0, 0, 0], [0, 0, 0.95], [0.8, 0, -0.4],
                                          [-0.8, 0.1, -0.4]])
    assert (predict_float64(model, [water_like])["energy"][0]
            - predict_float64(_pair(False), [water_like])["energy"][0]) > 1.0
    assert_prediction_physics(EnsemblePosterior([model, _pair(True)]).predict, water_like)

    crystal = Atoms("CO", positions=[[0, 0, 0], [0.55, 0.6, 0.5]], cell=[1.9, 2.0, 2.1],
                    pbc=True)
    from bayesal.bayes_model.data import atoms_to_graph, batch_graphs

    graph = atoms_to_graph(crystal, model.species, model.config.cutoff, with_labels=False)
    out = model(batch_graphs([graph], dtype=torch.float64), stress=True)
    expected = numerical_stress(lambda x: predict_float64(model, [x])["energy"][0], crystal)
    np.testing.assert_allclose(out["stress"].detach().numpy()[0], expected, atol=1e-6)
