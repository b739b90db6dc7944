"""The MD-stability check: broken trajectories are flagged with the reason, healthy ones
pass."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import molecule

from bayesal.bayes_model.stability import StabilityRule, bonds_of, first_break


def _healthy(n=6, seed=0):
    rng = np.random.default_rng(seed)
    start = molecule("CH3CH2OH")
    frames = [start]
    for _ in range(n - 1):
        a = start.copy()
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        frames.append(a)
    return frames


def _oh(atoms):
    o = int(np.flatnonzero(atoms.numbers == 8)[0])
    bonded = [j for i, j in bonds_of(atoms) if i == o] + [i for i, j in bonds_of(atoms)
                                                           if j == o]
    h = next(k for k in bonded if atoms.numbers[k] == 1)
    return o, h


def test_the_bonds_of_ethanol():
    assert len(bonds_of(molecule("CH3CH2OH"))) == 8  # C-C, C-O, O-H, 5 C-H


def test_a_healthy_trajectory_passes():
    frames = _healthy()
    out = first_break(frames, energies=[-10.0, -9.9, -10.1, -9.95, -10.05, -10.0])
    assert not out.broken and out.frame == -1 and out.reason == ""


def test_a_stretched_bond_breaks_the_trajectory_where_it_passes_the_factor():
    frames = _healthy()
    o, h = _oh(frames[0])
    r0 = frames[0].get_distance(o, h)
    for k, factor in ((3, 1.4), (4, 1.6)):  # 1.4x: still bonded; 1.6x > 1.5x: broken
        direction = frames[0].positions[h] - frames[0].positions[o]
        frames[k] = frames[0].copy()
        frames[k].positions[h] = frames[0].positions[o] + factor * direction
    out = first_break(frames)
    assert out.frame == 4 and f"bond {min(o, h)}-{max(o, h)} broken" in out.reason
    assert "1.60x" in out.reason and f"{r0:.2f} Å" in out.reason
    assert first_break(frames, rule=StabilityRule(stretch_factor=1.7)).frame == -1


def test_atoms_pushed_together_break_the_trajectory():
    frames = _healthy()
    frames[2] = frames[0].copy()
    frames[2].positions[5] = frames[2].positions[4] + [0.2, 0.0, 0.0]  # two H 0.2 Å apart
    out = first_break(frames)
    assert out.frame == 2 and "atoms 4 and 5 too close (0.20 Å)" in out.reason


@pytest.mark.parametrize(("energy", "reason"), [(-10.0 + 9 * 1.5, "energy blew up"),
                                               (float("nan"), "energy not finite")])
def test_an_energy_blow_up_breaks_the_trajectory(energy, reason):
    frames = _healthy(4)
    out = first_break(frames, energies=[-10.0, -10.1, energy, -10.0])
    assert out.frame == 2 and reason in out.reason


def test_non_finite_positions_break_the_trajectory():
    frames = _healthy(3)
    frames[1].positions[0, 0] = np.nan
    assert first_break(frames).reason == "positions not finite"
