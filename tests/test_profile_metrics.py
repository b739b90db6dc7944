"""Energy-profile metrics (reaction paths, scans) and metrics of energy-only structures."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator

from bayesal.bayes_model.calibration import evaluate_prediction
from bayesal.bayes_model.metrics import accuracy_metrics, profile_metrics
from bayesal.bayes_model.predict import Prediction


def _images(energies, forces=None):
    out = []
    for k, e in enumerate(energies):
        a = molecule("H2O")
        a.calc = SinglePointCalculator(a, energy=e,
                                       **({} if forces is None or forces[k] is None
                                          else {"forces": forces[k]}))
        out.append(a)
    return out


def _prediction(energies, n=3, force=0.0):
    s = len(energies)
    eye = np.broadcast_to(np.eye(3) * 0.01, (s * n, 3, 3)).copy()
    return Prediction(energy=np.asarray(energies, float), energy_var_epi=np.full(s, 1e-4),
                      energy_var_ale=np.full(s, 1e-4), forces=np.full((s * n, 3), force),
                      forces_cov_epi=eye, forces_cov_ale=eye, n_atoms=np.full(s, n))


def test_a_constant_offset_is_no_profile_error():
    ref = np.array([0.0, 0.3, 1.0, 0.4])  # a barrier of 1 eV at frame 2
    m = profile_metrics(_prediction(ref - 5.0), _images(ref))
    assert m == pytest.approx({"energy_profile_mae": 0, "energy_profile_rmse": 0,
                               "energy_range_error": 0, "energy_barrier_error": 0}, abs=1e-12)


def test_profile_errors_by_hand():
    ref = np.array([0.0, 0.3, 1.0, 0.4])
    pred = np.array([0.0, 0.3, 1.2, 0.4]) + 2.0  # barrier too high by 0.2 eV
    m = profile_metrics(_prediction(pred), _images(ref))
    d = (pred - pred.mean()) - (ref - ref.mean())
    assert m["energy_profile_mae"] == pytest.approx(np.abs(d).mean())
    assert m["energy_range_error"] == pytest.approx(0.2)
    assert m["energy_barrier_error"] == pytest.approx(0.2)


def test_energy_only_structures_get_no_force_metrics_and_mixed_ones_force_metrics_of_those():
    ref = [0.0, 0.5, 1.0]
    only = evaluate_prediction(_prediction([0.1, 0.5, 0.9]), _images(ref), profile=True)
    assert not [k for k in only if k.startswith("force")]
    assert only["energy_mae"] == pytest.approx(0.2 / 3)
    forces = [np.full((3, 3), 0.5), None, np.full((3, 3), 0.5)]
    mixed = accuracy_metrics(_prediction([0.1, 0.5, 0.9], force=0.2), _images(ref, forces))
    assert mixed["force_mae"] == pytest.approx(0.3)  # over the two structures with forces
    assert mixed["n_structures_with_forces"] == 2 and mixed["n_structures"] == 3
