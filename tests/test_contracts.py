"""The contracts shared by all packages (bayesal.contracts)."""

from __future__ import annotations

import json

import numpy as np
from ase.build import molecule

from bayesal.contracts import (
    RoundMetric,
    atoms_hash,
    closest_pair,
    metric_on_test,
    split_metric_on_test,
)


def test_test_set_metric_keys_round_trip():
    for quantity in ("force_mae", "energy_reliability_p10_recal"):
        for test_set in (None, "600K", "test_MD_300K"):
            assert split_metric_on_test(metric_on_test(quantity, test_set), quantity) == (True,
                                                                                    test_set)
    assert metric_on_test("force_mae") == RoundMetric.TEST_FORCE_MAE
    assert split_metric_on_test("test_energy_mae", "force_mae") == (False, None)
    assert split_metric_on_test("valid_force_mae", "force_mae") == (False, None)
    assert split_metric_on_test("test__force_mae", "force_mae") == (False, None)


def test_round_metric_keys_are_plain_strings_in_json():
    """Metrics travel as JSON (the rounds table): the enum keys must be their names."""
    metrics = {RoundMetric.N_SELECTED: 3, RoundMetric.TEST_FORCE_MAE: 0.1}
    assert json.loads(json.dumps(metrics)) == {"n_selected": 3, "test_force_mae": 0.1}


def test_structure_hash_and_closest_pair():
    a = molecule("H2O")
    b = a.copy()
    b.positions += 4e-7  # below the 1e-6 Å resolution
    c = a.copy()
    c.positions[0, 0] += 1e-5
    assert atoms_hash(a) == atoms_hash(b) != atoms_hash(c)
    assert closest_pair(a) is None
    a.positions[1] = a.positions[0] + [0.05, 0, 0]
    i, j, d = closest_pair(a)
    assert {i, j} == {0, 1} and np.isclose(d, 0.05)
