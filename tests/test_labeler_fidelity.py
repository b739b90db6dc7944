"""PySCF labels against the external ORCA references of the shared data (real DFT, slow)."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest

from bayesal.labelers import PySCFLabeler

pytestmark = pytest.mark.slow


def compare(labeler, frames):
    results = labeler.label_many(frames, workers=2)
    assert all(r.ok for r in results), [r.error for r in results]
    ref_e = np.array([f.get_potential_energy() for f in frames])
    our_e = np.array([r.energy for r in results])
    force_mae = np.mean([np.abs(r.forces - f.get_forces()).mean()
                         for r, f in zip(results, frames, strict=True)])
    d_ref, d_our = ref_e[1] - ref_e[0], our_e[1] - our_e[0]
    return force_mae, abs(d_our - d_ref)


def test_acac_pbe_d3bj_def2svp_matches_orca(shared_data):
    frames = ase.io.read(shared_data / "acac" / "train_300K.xyz", "0:200:150")  # 2 frames
    mae, d_delta = compare(PySCFLabeler("pbe", "def2-svp", dispersion="d3bj"), frames)
    assert mae < 3e-3, f"force MAE {mae * 1e3:.2f} meV/Å"
    assert d_delta < 5e-3, f"relative energy off by {d_delta * 1e3:.2f} meV"


def test_ethanol_pbe_def2svp_matches_orca(shared_data):
    frames = ase.io.read(shared_data / "ethanol" / "train.xyz", "0:400:300")
    mae, d_delta = compare(PySCFLabeler("pbe", "def2-svp"), frames)
    assert mae < 3e-3, f"force MAE {mae * 1e3:.2f} meV/Å"
    assert d_delta < 5e-3, f"relative energy off by {d_delta * 1e3:.2f} meV"
