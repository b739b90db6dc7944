"""Helpers the tests share (import them with ``from helpers import ...``; fixtures stay in
conftest.py)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rattled_waters(n: int, seed: int = 0):
    """``n`` distinct water molecules (positions rattled by 0.05 Å)."""
    import numpy as np
    from ase.build import molecule

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        a = molecule("H2O")
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        images.append(a)
    return images


def displaced_pairs(atoms, coords, h: float):
    """For each (atom, component) in ``coords``: ``atoms`` displaced by +h and by -h along
    it (central finite differences: label them, then ``fd_forces``)."""
    images = []
    for a, c in coords:
        for sign in (1, -1):
            img = atoms.copy()
            img.positions[a, c] += sign * h
            images.append(img)
    return images


def fd_forces(energies, h: float) -> list[float]:
    """-dE/dr from the energies of ``displaced_pairs`` (in its order)."""
    return [-(energies[2 * k] - energies[2 * k + 1]) / (2 * h)
            for k in range(len(energies) // 2)]


def perturbed_model(config, species, *, seed: int, scale: float, avg_neighbors: float):
    """An untrained float64 potential with zero energy shifts (large constants would only
    add rounding noise to finite differences) and every weight perturbed, so that heads
    that start at zero (covariances, variances) are not trivially so and tests can fail."""
    import torch

    from bayesal.bayes_model.model import MVEPotential

    torch.manual_seed(seed)
    m = MVEPotential(config, species, [0.0] * len(species), scale=scale,
                     avg_neighbors=avg_neighbors).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def predict_float64(model, images) -> dict:
    """The potential's raw outputs (numpy) for ``images`` in one float64 batch."""
    import torch

    from bayesal.bayes_model.data import atoms_to_graph, batch_graphs

    graphs = [atoms_to_graph(a, model.species, model.config.cutoff, with_labels=False)
              for a in images]
    out = model(batch_graphs(graphs, dtype=torch.float64))
    return {k: v.detach().numpy() for k, v in out.items()}


TINY = {"channels": 4, "n_layers": 1, "radial_hidden": 8, "l_max": 1}  # fast test models


def ethanol_campaign(folder, shared_data, *, name="eth", n_pool=40, n_test=6, **overrides):
    """Pool/test files from the shared ethanol data and a campaign YAML (replay labels)."""
    import ase.io
    import yaml

    pool = ase.io.read(shared_data / "ethanol" / "train.xyz", f":{n_pool}")
    test = ase.io.read(shared_data / "ethanol" / "test_MD.xyz", f":{n_test}")
    ase.io.write(folder / "pool.xyz", pool)
    ase.io.write(folder / "test.xyz", test)
    cfg = {"name": name, "seed": 0,
           "data": {"pool_files": ["pool.xyz"], "initial_random": 6,
                    "test_files": ["test.xyz"]},
           "members": 2, "model": TINY, "train": {"max_epochs": 3, "batch_size": 4},
           "acquisition": {"n_select": 4, "selection": "diverse"},
           "labeler": {"kind": "replay", "method": "pbe", "basis": "def2-svp",
                       "replay_files": ["pool.xyz", "test.xyz"], "workers": 2},
           "stop": {"max_rounds": 3}}
    for key, value in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def shared_data_dir() -> Path:
    """The reference DFT data: shipped with bayesal (decompressed once into a cache), or
    ``$BAYESAL_SHARED_DATA`` when set."""
    from bayesal.datasets import reference_dir

    return reference_dir()


def assert_prediction_physics(predict, atoms, *, seed: int = 0, fd_step: float = 1e-4,
                              atol: float = 1e-6) -> None:
    """The physics every posterior's ``predict(images) -> Prediction`` must obey, for a
    float64 model, on ``atoms`` (a molecule):

    * energy and its variances invariant, forces and force covariances equivariant under a
      random rotation with inversion plus a translation (epistemic and aleatoric parts);
    * atoms permuted: the same numbers permuted;
    * batching: a structure predicted with another beside it gives its own numbers;
    * forces = −∂E/∂r by central finite differences on a few coordinates.
    """
    import numpy as np
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    rot = -Rotation.random(random_state=seed + 11).as_matrix()
    moved = atoms.copy()
    moved.positions = atoms.positions @ rot.T + np.array([3.0, -1.0, 2.0])
    a, b = predict([atoms]), predict([moved])
    for key in ("energy", "energy_var_epi", "energy_var_ale"):
        np.testing.assert_allclose(getattr(b, key), getattr(a, key), atol=atol, rtol=1e-7,
                                   err_msg=key)
    np.testing.assert_allclose(b.forces, a.forces @ rot.T, atol=atol)
    for key in ("forces_cov_epi", "forces_cov_ale"):
        expected = np.einsum("ij,njk,lk->nil", rot, getattr(a, key), rot)
        np.testing.assert_allclose(getattr(b, key), expected, atol=atol * 1e-2, err_msg=key)

    perm = np.random.default_rng(seed).permutation(len(atoms))
    c = predict([atoms[perm]])
    np.testing.assert_allclose(c.energy, a.energy, atol=atol, rtol=1e-7)
    np.testing.assert_allclose(c.forces, a.forces[perm], atol=atol)
    np.testing.assert_allclose(c.forces_cov_epi, a.forces_cov_epi[perm], atol=atol * 1e-2)

    other = molecule("H2O")
    both = predict([other, atoms])
    n = len(other)
    np.testing.assert_allclose(both.energy[1:], a.energy, atol=atol, rtol=1e-7)
    np.testing.assert_allclose(both.energy_var_epi[1:], a.energy_var_epi, atol=atol * 1e-2,
                               rtol=1e-6)
    np.testing.assert_allclose(both.forces[n:], a.forces, atol=atol)
    np.testing.assert_allclose(both.forces_cov_epi[n:], a.forces_cov_epi, atol=atol * 1e-2)

    assert np.abs(a.forces).max() > 1e-3, "forces must not vanish for the check to mean much"
    for i, k in [(0, 0), (1, 2), (len(atoms) - 1, 1)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, k] += fd_step
        minus.positions[i, k] -= fd_step
        e = predict([plus, minus]).energy
        fd = -(e[0] - e[1]) / (2 * fd_step)
        assert abs(fd - a.forces[i, k]) < 1e-5 + 1e-4 * abs(fd), (i, k, fd, a.forces[i, k])
