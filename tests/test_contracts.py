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


def test_reference_data_ship_with_bayesal_and_decompress_once(tmp_path, monkeypatch):
    """The tests, benchmarks and quickstart need nothing outside the repository: the
    reference DFT data are packaged (compressed) and decompressed into a cache."""
    import os

    import ase.io
    import pytest

    from bayesal.datasets import reference_dir

    monkeypatch.delenv("BAYESAL_SHARED_DATA", raising=False)
    folder = reference_dir(tmp_path / "cache")
    counts = {p.relative_to(folder).as_posix(): len(ase.io.read(p, ":"))
              for p in sorted(folder.glob("*/*.xyz"))}
    assert counts == {"acac/isolated_atoms.xyz": 3, "acac/test_MD_300K.xyz": 650,
                      "acac/train_300K.xyz": 500, "acac/train_600K.xyz": 500,
                      "ethanol/isolated_atoms.xyz": 4, "ethanol/test_MD.xyz": 1000,
                      "ethanol/train.xyz": 1000}
    frame = ase.io.read(folder / "ethanol" / "train.xyz", 0)
    assert frame.get_forces().shape == (9, 3) and frame.get_potential_energy() < -4000
    stamp = os.stat(folder / "ethanol" / "train.xyz").st_mtime_ns
    assert reference_dir(tmp_path / "cache") == folder  # a second call decompresses nothing
    assert os.stat(folder / "ethanol" / "train.xyz").st_mtime_ns == stamp
    monkeypatch.setenv("BAYESAL_SHARED_DATA", str(tmp_path / "mine"))
    with pytest.raises(FileNotFoundError, match="BAYESAL_SHARED_DATA"):
        reference_dir()
    (tmp_path / "mine").mkdir()
    assert reference_dir() == tmp_path / "mine"
