"""Periodic structures end to end: the potential's physics in a cell (images, boundary,
extensivity), and a campaign on a metal cell that explores by MD in the cell, is labelled
by an ASE calculator (EMT), stored with its cell, exported, and resumed."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import yaml
from ase.build import bulk
from helpers import TINY, perturbed_model, predict_float64

from bayesal.bayes_model.model import ModelConfig

SPECIES = [13, 29]  # Al, Cu
CFG = ModelConfig(channels=8, n_layers=2, l_max=2, radial_hidden=16, cutoff=4.0)


@pytest.fixture(scope="module")
def model():
    return perturbed_model(CFG, SPECIES, seed=1, scale=1.1, avg_neighbors=12.0)


predict = predict_float64


def alloy(seed: int = 0):
    """A rattled, sheared Cu3Al cell smaller than twice the cutoff: atoms see their own
    images."""
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.numbers[0] = 13
    atoms.set_cell(atoms.cell.array + np.array([[0, 0.2, 0], [0, 0, 0], [0.3, 0, 0]]),
                   scale_atoms=True)
    atoms.positions += np.random.default_rng(seed).normal(scale=0.1, size=(4, 3))
    return atoms


def test_energy_and_forces_do_not_depend_on_which_image_is_stored(model):
    atoms = alloy()
    moved = atoms.copy()
    moved.positions[1] += atoms.cell[0] - 2 * atoms.cell[2]  # the same crystal
    everything = atoms.copy()
    everything.positions += [5.1, -2.3, 0.7]  # a rigid translation of the periodic crystal
    everything.wrap()
    a, b, c = (predict(model, [x]) for x in (atoms, moved, everything))
    for other in (b, c):
        assert abs(a["energy"][0] - other["energy"][0]) < 1e-9
        assert abs(a["energy_var"][0] - other["energy_var"][0]) < 1e-12
        np.testing.assert_allclose(other["forces"], a["forces"], atol=1e-9)
    assert np.abs(a["forces"]).max() > 1e-3  # a rattled cell has forces


def test_a_supercell_has_the_energy_of_its_copies_and_their_forces(model):
    atoms = alloy(2)
    one = predict(model, [atoms])
    big = predict(model, [atoms.repeat((2, 1, 3))])
    assert abs(big["energy"][0] - 6 * one["energy"][0]) < 1e-8
    np.testing.assert_allclose(big["forces"], np.tile(one["forces"], (6, 1)), atol=1e-9)


def test_forces_are_minus_energy_gradient_across_the_cell_boundary(model):
    atoms = alloy(3)
    atoms.positions[2] = atoms.cell.cartesian_positions([0.9995, 0.5, 0.0002])[0]
    forces = predict(model, [atoms])["forces"]
    h = 1e-3  # steps carry the atom across the x and z faces of the cell
    for c in range(3):
        energies = []
        for sign in (1, -1):
            img = atoms.copy()
            img.positions[2, c] += sign * h
            energies.append(predict(model, [img])["energy"][0])
        fd = -(energies[0] - energies[1]) / (2 * h)
        assert abs(fd - forces[2, c]) < 1e-5, (c, fd, forces[2, c])


def _cells(n: int, seed: int):
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
        a.set_cell(a.cell.array * (1 + rng.normal(scale=0.01)), scale_atoms=True)
        a.positions += rng.normal(scale=0.05 + 0.1 * rng.random(), size=a.positions.shape)
        frames.append(a)
    return frames


def test_a_periodic_campaign_explores_labels_stores_exports_and_resumes(prefect_api, sqlite_url,
                                                               tmp_path, monkeypatch):
    from ase.calculators.emt import EMT
    from sqlalchemy import func, select

    from bayesal.db import Label, Round, Structure, make_engine
    from bayesal.db.export import export_campaign
    from bayesal.flows.campaign import campaign

    monkeypatch.setenv("BAYESAL_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("BAYESAL_DATA_DIR", str(tmp_path / "data"))
    ase.io.write(tmp_path / "pool.xyz", _cells(30, 0))
    ase.io.write(tmp_path / "test.xyz", _cells(4, 1))
    cfg = {"name": "cu", "seed": 0,
           "data": {"pool_files": ["pool.xyz"], "initial_random": 5,
                    "test_files": ["test.xyz"]},
           "members": 2, "model": TINY, "train": {"max_epochs": 3, "batch_size": 4},
           "acquisition": {"n_select": 3},
           "labeler": {"kind": "ase", "calculator": "ase.calculators.emt.EMT", "workers": 2,
                       "timeout_s": 60},
           "explorer": {"temperatures_K": [300], "steps": 20, "record_every": 5,
                        "seeds_per_round": 2, "max_force_std": 5.0},  # MD in the cell
           "stop": {"max_rounds": 2}}
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert campaign(str(path), resume=False)["rounds"] == 2
    cfg["stop"]["max_rounds"] = 3
    path.write_text(yaml.safe_dump(cfg))
    assert campaign(str(path), resume=True)["rounds"] == 3

    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(Round)) == 3
            n_labels = conn.scalar(select(func.count()).select_from(Label))
            assert n_labels == 5 + 4 + 3 * 3  # initial, test, three rounds: none twice
            assert conn.scalar(select(func.count()).select_from(Label)
                               .where(Label.status != "ok")) == 0
            assert set(conn.scalars(select(Structure.pbc))) == {"TTT"}
            sources = set(conn.scalars(select(Structure.source)))
            assert sources == {"pool", "explored", "test"}
    finally:
        engine.dispose()
    export_campaign(sqlite_url, "cu", tmp_path / "cu.xyz")
    exported = ase.io.read(tmp_path / "cu.xyz", ":")
    assert len(exported) == n_labels
    pool = {round(float(a.cell.volume), 9) for a in _cells(30, 0) + _cells(4, 1)}
    for atoms in exported:
        assert atoms.pbc.all() and round(float(atoms.cell.volume), 9) in pool
        ref = atoms.copy()
        ref.calc = EMT()
        assert abs(atoms.info["REF_energy"] - ref.get_potential_energy()) < 1e-9
        np.testing.assert_allclose(atoms.arrays["REF_forces"], ref.get_forces(), atol=1e-9)


def strained(atoms, a: int, b: int, h: float):
    """``atoms`` under the symmetric deformation 1 + D, D_ab = D_ba = h."""
    d = np.zeros((3, 3))
    d[a, b] = d[b, a] = h
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ (np.eye(3) + d), scale_atoms=True)
    return out


def numerical_stress(energy, atoms, h: float = 1e-4) -> np.ndarray:
    """(1/V) dE/dε by central differences of ``energy(atoms)`` (ASE's convention)."""
    out = np.zeros((3, 3))
    for a in range(3):
        for b in range(a, 3):
            plus, minus = energy(strained(atoms, a, b, h)), energy(strained(atoms, a, b, -h))
            out[a, b] = out[b, a] = (plus - minus) / (2 * h * (1 if a == b else 2))
    return out / atoms.get_volume()


def test_stress_is_the_energy_derivative_under_strain(model):
    import torch

    from bayesal.bayes_model.data import atoms_to_graph, batch_graphs

    atoms = alloy(4)
    graphs = [atoms_to_graph(x, SPECIES, CFG.cutoff, with_labels=False)
              for x in (atoms, atoms.repeat((1, 2, 1)))]
    graphs.append(atoms_to_graph(molecule_of(atoms), SPECIES, CFG.cutoff, with_labels=False))
    out = model(batch_graphs(graphs, dtype=torch.float64), stress=True)
    stress = out["stress"].detach().numpy()
    expected = numerical_stress(lambda x: predict(model, [x])["energy"][0], atoms)
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(stress[0], expected, atol=1e-7)
    np.testing.assert_allclose(stress[1], stress[0], atol=1e-10)  # intensive
    np.testing.assert_allclose(stress[0], stress[0].T, atol=1e-12)
    assert np.isnan(stress[2]).all()  # no cell: no stress
    without = model(batch_graphs(graphs, dtype=torch.float64))
    np.testing.assert_allclose(out["forces"].detach().numpy(),
                               without["forces"].detach().numpy(), atol=1e-12)


def molecule_of(atoms):
    """The same atoms without a cell."""
    out = atoms.copy()
    out.pbc = False
    return out


def test_ensemble_stress_through_the_calculator_and_its_spread(model):
    from ase.calculators.calculator import PropertyNotImplementedError

    from bayesal.bayes_model.calculator import BayesalCalculator
    from bayesal.bayes_model.posterior import EnsemblePosterior

    other = perturbed_model(CFG, SPECIES, seed=7, scale=1.1, avg_neighbors=12.0)
    calc = BayesalCalculator(posterior=EnsemblePosterior([model, other]), recalibrated=False)
    atoms = alloy(5)
    atoms.calc = calc
    stress = atoms.get_stress(voigt=False)
    spread = calc.results["stress_std_epistemic"].copy()

    def energy(x):
        x.calc = calc  # (calc.results now hold the strained cells': read before)
        return x.get_potential_energy()

    np.testing.assert_allclose(stress, numerical_stress(energy, atoms), atol=1e-7)
    import torch

    from bayesal.bayes_model.data import atoms_to_graph, batch_graphs

    batch = batch_graphs([atoms_to_graph(atoms, SPECIES, CFG.cutoff, with_labels=False)],
                         dtype=torch.float64)
    each = np.stack([m(batch, stress=True)["stress"].detach().numpy()[0]
                     for m in (model, other)])
    voigt = ([0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1])
    np.testing.assert_allclose(spread, each.std(0)[voigt], atol=1e-10)
    assert spread.max() > 0
    gas = molecule_of(atoms)
    gas.calc = calc
    with pytest.raises(PropertyNotImplementedError):
        gas.get_stress()
    # prediction files (bayesal predict) carry it as an array ASE reads back
    import io

    import ase.io

    from bayesal.bayes_model.predict import file_fields, structure_results
    from bayesal.db.export import atoms_extxyz

    pred = calc.posterior.predict([atoms, gas])
    frames = []
    for k, x in enumerate((atoms, gas)):
        info, arrays = file_fields(structure_results(pred, k))
        frames.append(atoms_extxyz(x, info, arrays))
    back = ase.io.read(io.StringIO("".join(frames)), ":", format="extxyz")
    np.testing.assert_allclose(back[0].info["pred_stress"], stress[voigt], atol=1e-12)
    assert "pred_stress" not in back[1].info


def test_laplace_stress_is_the_map_stress_with_its_last_layer_variance(model):
    import torch

    from bayesal.bayes_model.data import atoms_to_graph, batch_graphs
    from bayesal.bayes_model.laplace import LastLayerLaplace

    d = model.n_features
    rng = np.random.default_rng(0)
    a = rng.normal(size=(d, d))
    laplace = LastLayerLaplace(model, a @ a.T / d, prior_precision=2.0)
    cells = [alloy(6), alloy(7)]
    pred = laplace.predict([cells[0], molecule_of(cells[0]), cells[1]])
    assert np.isnan(pred.stress[1]).all() and np.isnan(pred.stress_var_epi[1]).all()

    def stresses(m):
        batch = batch_graphs([atoms_to_graph(x, SPECIES, CFG.cutoff, with_labels=False)
                              for x in cells], dtype=torch.float64)
        return m(batch, stress=True)["stress"].detach().numpy()

    np.testing.assert_allclose(pred.stress[[0, 2]], stresses(model), atol=1e-10)
    # the stress is linear in the last-layer weights w: σ(w) = A w; Var = A Σ Aᵀ
    import copy

    probe = copy.deepcopy(model)
    base = stresses(probe)
    columns = []
    for k in range(d):
        with torch.no_grad():
            probe.energy_head.weight.copy_(model.energy_head.weight)
            probe.energy_head.weight[0, k] += 1.0
        columns.append(stresses(probe) - base)
    jac = np.stack(columns, axis=-1)  # (2, 3, 3, d)
    cov = laplace._covariance(laplace.prior_precision)
    expected = np.einsum("sabd,de,sabe->sab", jac, cov, jac)
    np.testing.assert_allclose(pred.stress_var_epi[[0, 2]], expected, rtol=1e-6, atol=1e-14)
    assert expected.max() > 0
