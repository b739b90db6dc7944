"""Initial-guess reuse: the rotated density matrix is exact, and reuse saves SCF cycles."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import molecule
from pyscf import gto, scf
from scipy.spatial.transform import Rotation

from bayesal.labelers import PySCFLabeler
from bayesal.labelers._pyscf_run import _rotate_dm
from bayesal.labelers.guess_store import Guess, GuessStore, kabsch


def converged_dm(atoms, basis="6-31g*"):
    mol = gto.M(atom=list(zip(atoms.get_chemical_symbols(), atoms.positions.tolist(),
                              strict=True)), basis=basis, unit="Angstrom", verbose=0)
    mf = scf.RHF(mol)
    mf.conv_tol = 1e-11
    mf.kernel()
    return mol, mf.make_rdm1()


def test_kabsch_recovers_a_rotation():
    pos = molecule("CH3CH2OH").positions
    rot = Rotation.random(random_state=3).as_matrix()
    new = (pos - pos.mean(0)) @ rot.T + np.array([1.0, -2.0, 0.5])
    found, rmsd = kabsch(pos, new)
    np.testing.assert_allclose(found, rot, atol=1e-10)
    assert rmsd < 1e-10


def test_rotated_density_matrix_equals_converged_one_of_rotated_molecule():
    atoms = molecule("CH3CH2OH")
    _, dm = converged_dm(atoms)
    rotated = atoms.copy()
    rot = Rotation.random(random_state=7).as_matrix()
    rotated.positions = (atoms.positions - atoms.positions.mean(0)) @ rot.T + 3.0
    mol2, dm2 = converged_dm(rotated)
    found, _ = kabsch(atoms.positions, rotated.positions)
    guess = Guess(key="x", rmsd=0.0, rotation=found, dm=dm)
    assert np.abs(_rotate_dm(mol2, guess, restricted=True) - dm2).max() < 1e-6
    assert np.abs(dm - dm2).max() > 0.1  # without the rotation the guess would be wrong


def test_store_finds_nearest_of_same_molecule_only(tmp_path):
    store = GuessStore(tmp_path, "abc", max_rmsd=0.5)
    eth = molecule("CH3CH2OH")
    store.save("a", eth.numbers, eth.positions, np.eye(3))
    far = eth.copy()
    far.positions[0] += 3.0
    store.save("b", far.numbers, far.positions, 2 * np.eye(3))
    near = eth.copy()
    near.positions += np.random.default_rng(0).normal(scale=0.01, size=near.positions.shape)
    hit = store.nearest(near.numbers, near.positions)
    assert hit.key == "a" and hit.rmsd < 0.03 and (hit.dm == np.eye(3)).all()
    assert store.nearest(near.numbers[::-1].copy(), near.positions) is None  # other order
    assert GuessStore(tmp_path, "other").nearest(near.numbers, near.positions) is None


def test_reuse_saves_cycles_and_leaves_the_answer_unchanged(tmp_path):
    atoms = molecule("CH3CH2OH")
    neighbour = atoms.copy()
    rng = np.random.default_rng(1)
    neighbour.positions += rng.normal(scale=0.02, size=atoms.positions.shape)
    rot = Rotation.random(random_state=2).as_matrix()
    neighbour.positions = neighbour.positions @ rot.T  # MD neighbours may also rotate

    plain = PySCFLabeler("hf", "6-31g*", conv_tol=1e-10)
    reuse = PySCFLabeler("hf", "6-31g*", conv_tol=1e-10, guess_dir=tmp_path)
    assert reuse.label(atoms).provenance["guess"]["source"] == "minao"
    cold = plain.label(neighbour)
    warm = reuse.label(neighbour)
    assert warm.provenance["guess"]["source"] == "reuse"
    assert warm.provenance["guess"]["rmsd_A"] < 0.1
    assert warm.n_scf_cycles < cold.n_scf_cycles
    assert abs(warm.energy - cold.energy) < 1e-6
    assert np.abs(warm.forces - cold.forces).max() < 1e-4


def test_extrapolation_weights_follow_a_straight_path():
    from bayesal.labelers.guess_store import extrapolation_weights

    x0 = molecule("CH3CH2OH").positions
    step = np.random.default_rng(4).normal(scale=0.02, size=x0.shape)
    # neighbours at x0 (nearest) and x0 - step; the target continues the line: c = -1
    c = extrapolation_weights(x0 + step, [x0, x0 - step])
    np.testing.assert_allclose(c, [-1.0], atol=1e-5)
    # a displacement orthogonal to the history is not extrapolated
    ortho = np.zeros_like(x0)
    ortho[0, 0] = 0.02
    other = np.zeros_like(x0)
    other[1, 1] = 0.02
    np.testing.assert_allclose(extrapolation_weights(x0 + ortho, [x0, x0 - other]), [0.0],
                               atol=1e-9)
    assert extrapolation_weights(x0, [x0]).size == 0


def test_extrapolated_guess_beats_the_nearest_one_along_md_like_path(tmp_path):
    from bayesal.labelers._pyscf_run import build_mol, reused_guess

    base = molecule("CH3CH2OH")
    step = np.random.default_rng(5).normal(scale=0.02, size=base.positions.shape)
    path = [base.positions + k * step for k in range(3)]
    dms = []
    store = GuessStore(tmp_path, "s")
    for k, pos in enumerate(path):
        atoms = base.copy()
        atoms.positions = pos
        _, dm = converged_dm(atoms, basis="sto-3g")
        dms.append(dm)
        if k < 2:
            store.save(f"k{k}", base.numbers, pos, dm)
    mol = build_mol(base.get_chemical_symbols(), path[2], basis="sto-3g", charge=0, spin=0,
                    max_memory_mb=1000)
    dm, info = reused_guess(mol, store, base.numbers, path[2], "new", restricted=True)
    assert info["neighbours"] == 2 and info["weights"][0] == pytest.approx(-1, abs=0.01)
    err_extrapolated = np.abs(dm - dms[2]).max()
    err_nearest = np.abs(dms[1] - dms[2]).max()
    assert err_extrapolated < 0.25 * err_nearest


def test_a_damaged_or_foreign_guess_costs_the_guess_not_the_label(tmp_path):
    """A stored density of the wrong shape (another basis, a damaged file) used to fail
    every later label of that molecule; it is now ignored and recorded in the provenance."""
    lab = PySCFLabeler("hf", "sto-3g", guess_dir=tmp_path)
    first = molecule("H2O")
    assert lab.label(first).ok
    (entry,) = (tmp_path).rglob("*.npz")
    with np.load(entry) as data:
        positions = data["positions"]
    np.savez(entry, positions=positions, dm=np.eye(3))  # 3 x 3: not water's 7 AOs
    second = molecule("H2O")
    second.positions[0, 0] += 0.02
    res = lab.label(second)
    assert res.ok, res.error
    assert res.provenance["guess"]["source"] == "minao"
    assert res.provenance["guess"]["ignored"] == [entry.stem]
    (tmp_path / "junk.npz").write_bytes(b"not npz")  # outside the store's folders: harmless
    entry.write_bytes(b"\x00" * 10)  # unreadable: skipped like a half-written file
    assert lab.label(second).ok


def test_the_guess_store_keeps_at_most_max_kept_entries(tmp_path):
    import os
    import time

    store = GuessStore(tmp_path, "abc", max_kept=3)
    water = molecule("H2O")
    for i in range(5):
        store.save(f"k{i}", water.numbers, water.positions + 0.01 * i, np.eye(7))
        os.utime(next(tmp_path.rglob(f"k{i}.npz")), (time.time() - 100 + i,) * 2)
    assert sorted(p.stem for p in tmp_path.rglob("*.npz")) == ["k2", "k3", "k4"]
