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


class _SpringsTo:
    """A stand-in posterior (the MD is under test, not a model): every atom tied to its
    place in ``reference`` by a spring of ``k`` eV/Å² (k = 0: no forces at all)."""

    recalibration = None

    def __init__(self, reference, k):
        self.reference, self.k = reference.positions.copy(), k

    def predict(self, images):
        from bayesal.bayes_model.predict import Prediction

        forces = np.concatenate([-self.k * (a.positions - self.reference) for a in images])
        energy = np.array([0.5 * self.k * ((a.positions - self.reference) ** 2).sum()
                           for a in images])
        n, s = len(forces), len(images)
        return Prediction(energy, np.zeros(s), np.zeros(s), forces, np.zeros((n, 3, 3)),
                          np.zeros((n, 3, 3)), np.array([len(a) for a in images]))


def test_time_to_break_tells_a_stable_model_from_one_without_walls():
    """Hot MD without forces flies apart (a bond breaks); with stiff springs to the start it
    stays whole for the whole run; seeds run together give what each gives alone."""
    from bayesal.bayes_model.stability import time_to_break, times_to_break

    start = molecule("CH3CH2OH")
    loose = times_to_break(_SpringsTo(start, 0.0), start, seeds=[0, 1, 2], steps=600)
    assert all(b.broken and ("broken" in b.reason or "too close" in b.reason) for b in loose)
    assert all(0 < b.time_fs < 300 for b in loose)
    assert loose[1] == time_to_break(_SpringsTo(start, 0.0), start, seed=1, steps=600)
    stiff = times_to_break(_SpringsTo(start, 50.0), start, seeds=[0, 1], steps=300)
    assert [(b.broken, b.time_fs) for b in stiff] == [(False, 150.0), (False, 150.0)]


def _acac_enol(shared_data):
    """Acetylacetone's enol: O3-H11...O5, the proton that hops between the oxygens."""
    import ase.io

    atoms = ase.io.read(shared_data / "acac" / "train_300K.xyz", 0)
    assert atoms[3].symbol == atoms[5].symbol == "O" and atoms[11].symbol == "H"
    assert [3, 11] in bonds_of(atoms).tolist() and atoms.get_distance(5, 11) > 1.7
    return atoms


def test_a_proton_transferred_to_the_other_oxygen_is_not_a_broken_bond(shared_data):
    """The enol proton moved to O5 (1.0 Å from it, 1.7x its bond from O3): chemistry, not a
    breakdown; the frame passes."""
    start = _acac_enol(shared_data)
    moved = start.copy()
    o3, o5 = start.positions[3], start.positions[5]
    moved.positions[11] = o5 + 1.0 * (o3 - o5) / np.linalg.norm(o3 - o5)
    assert moved.get_distance(3, 11) > 1.5 * start.get_distance(3, 11)
    assert not first_break([start, moved]).broken


def test_a_proton_pulled_away_from_both_oxygens_is_a_broken_bond(shared_data):
    """The same proton pulled to 1.6x its bond from O3, out of the ring's plane (away from
    O5 and the carbons): bonded to no heavy atom, the frame is broken."""
    start = _acac_enol(shared_data)
    pulled = start.copy()
    o3, o5, c2 = start.positions[3], start.positions[5], start.positions[2]
    normal = np.cross(o5 - o3, c2 - o3)
    normal /= np.linalg.norm(normal)
    pulled.positions[11] = o3 + 1.6 * start.get_distance(3, 11) * normal
    d = pulled.get_distances(11, [0, 1, 2, 4, 5, 6])
    assert (d > 1.5 * (0.31 + 0.76)).all()  # beyond 1.5x an X-H bond from every heavy atom
    assert pulled.get_distance(5, 11) > 1.5 * 0.97
    out = first_break([start, pulled])
    assert out.frame == 1 and "bond 3-11 broken" in out.reason


def test_a_broken_bond_is_named_even_beside_a_longer_transferred_proton(shared_data):
    """Proton moved to O5 (1.7x from O3) and a methyl C-H stretched 1.6x: the C-H is named."""
    start = _acac_enol(shared_data)
    frame = start.copy()
    o3, o5 = start.positions[3], start.positions[5]
    frame.positions[11] = o5 + 1.0 * (o3 - o5) / np.linalg.norm(o3 - o5)
    frame.positions[8] = start.positions[4] + 1.6 * (start.positions[8] - start.positions[4])
    assert "bond 4-8 broken" in first_break([start, frame]).reason


# Periodic structures: bonds across the cell's faces, atoms wrapped back into the cell.

def _boxed(frames, centre, size=12.0, drift=(0.7, 0.5, 0.3)):
    """``frames`` as periodic ones in a cubic box: moved so that ``centre`` sits on the
    box's corner (the molecule straddles its faces), frame k moved on by k x ``drift`` (so
    atoms cross the faces between frames) and wrapped back into the box."""
    out = []
    for k, frame in enumerate(frames):
        a = frame.copy()
        a.cell, a.pbc = [size] * 3, True
        a.positions -= np.asarray(centre) + k * np.asarray(drift)
        a.wrap()
        out.append(a)
    return out


def _stretched():
    frames = _healthy()
    o, h = _oh(frames[0])
    frames[4] = frames[0].copy()
    frames[4].positions[h] = frames[0].positions[o] + 1.6 * (frames[0].positions[h]
                                                           - frames[0].positions[o])
    return frames


def _pushed():
    frames = _healthy()
    frames[2] = frames[0].copy()
    frames[2].positions[5] = frames[2].positions[4] + [0.2, 0.0, 0.0]
    return frames


@pytest.mark.parametrize("build", [_healthy, _stretched, _pushed])
def test_a_molecule_split_by_the_cell_faces_is_judged_as_the_molecule(build):
    """The same frames as a molecule and wrapped into a periodic box across its faces (atoms
    crossing them between frames): the same first broken frame and reason."""
    from bayesal.bayes_model.stability import BondReference

    frames = build()
    boxed = _boxed(frames, frames[0].positions.mean(0))
    assert np.ptp(boxed[0].positions, axis=0).min() > 6.0  # split: atoms on both sides
    reference = BondReference.of(boxed[0])
    assert reference.shifts is not None and np.abs(reference.shifts).sum() > 0
    assert sorted(map(tuple, reference.pairs.tolist())) == sorted(
        map(tuple, bonds_of(frames[0]).tolist()))
    mol, per = first_break(frames), first_break(boxed)
    assert (per.frame, per.reason) == (mol.frame, mol.reason)
    assert build is _healthy or per.broken


def test_a_proton_transferred_across_the_cell_face_is_not_a_broken_bond(shared_data):
    """acac's enol proton moved to O5, the two on opposite sides of the cell's faces: it
    is bonded to O5's image and the frame passes; pulled away from both, it is broken."""
    start = _acac_enol(shared_data)
    moved = start.copy()
    o3, o5 = start.positions[3], start.positions[5]
    moved.positions[11] = o5 + 1.0 * (o3 - o5) / np.linalg.norm(o3 - o5)
    boxed = _boxed([start, moved], (moved.positions[11] + o5) / 2, drift=(0, 0, 0))
    assert boxed[1].get_distance(5, 11) > 6.0  # apart in the cell, 1.0 Å across the face
    assert not first_break(boxed).broken
    pulled = _boxed([start, start.copy()], (moved.positions[11] + o5) / 2, drift=(0, 0, 0))
    normal = np.cross(o5 - o3, start.positions[2] - o3)
    pulled[1].positions[11] = pulled[1].positions[3] + 1.6 * start.get_distance(3, 11) * (
        normal / np.linalg.norm(normal))
    pulled[1].wrap()
    assert "bond 3-11 broken" in first_break(pulled).reason


def test_a_crystal_bonds_to_its_images_and_breaks_when_pulled_apart():
    """Diamond's 2-atom cell: 4 bonds, all to the other atom's images; a rattled and
    translated copy (atoms wrapped) is whole, the cell expanded 1.6x breaks them. A simple
    cubic cell of one atom bonds to its own images (3 bonds, each once)."""
    from ase.build import bulk

    from bayesal.bayes_model.stability import BondReference

    diamond = bulk("C", "diamond", a=3.567)
    ref = BondReference.of(diamond)
    assert len(ref.pairs) == 4 and (ref.pairs == [0, 1]).all()
    assert np.allclose(ref.lengths, 3.567 * np.sqrt(3) / 4)
    moved = diamond.copy()
    moved.positions += np.random.default_rng(0).normal(scale=0.05, size=(2, 3))
    moved.positions += np.array([5.1, 0.0, 0.0])
    moved.wrap()
    assert not first_break([diamond, moved]).broken
    expanded = diamond.copy()
    expanded.set_cell(1.6 * diamond.cell.array, scale_atoms=True)
    assert "bond 0-1 broken" in first_break([diamond, expanded]).reason
    single = BondReference.of(bulk("C", "sc", a=1.5))
    assert len(single.pairs) == 3 and (single.pairs == [0, 0]).all()
    assert sorted(map(tuple, np.abs(single.shifts).tolist())) == [(0, 0, 1), (0, 1, 0),
                                                                   (1, 0, 0)]


def test_atoms_too_close_across_the_cell_face_break_the_frame():
    """Two atoms 5 Å apart, then at x = 9.9 and 0.1 Å of a 10 Å cell: 9.8 Å apart in it,
    0.2 Å across the face."""
    from ase import Atoms

    apart = Atoms("OH", positions=[[2.5, 5, 5], [7.5, 5, 5]], cell=[10.0] * 3, pbc=True)
    squeezed = apart.copy()
    squeezed.positions[:, 0] = [9.9, 0.1]
    out = first_break([apart, squeezed])
    assert out.frame == 1 and "atoms 0 and 1 too close (0.20 Å)" in out.reason
    apart.pbc = squeezed.pbc = False  # as molecules: 9.8 Å apart, whole
    assert not first_break([apart, squeezed]).broken
