"""Losses against direct numpy evaluations on hand-made cases."""

from __future__ import annotations

import numpy as np
import torch

from bayesal.bayes_model import _keys as K
from bayesal.bayes_model.losses import compute_loss


def case():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 3, 3))
    cov = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(3)
    out = {"energy": torch.tensor([1.0, -2.0]), "energy_var": torch.tensor([0.5, 2.0]),
           "forces": torch.tensor(rng.normal(size=(4, 3))),
           "forces_cov": torch.tensor(cov)}
    batch = {K.ENERGY: torch.tensor([1.3, -1.0]), K.FORCES: torch.tensor(rng.normal(size=(4, 3))),
             K.N_ATOMS: torch.tensor([1, 3])}
    out = {k: v.double() for k, v in out.items()}
    batch[K.ENERGY] = batch[K.ENERGY].double()
    return out, batch, cov


def test_nll_jef_equals_numpy():
    out, batch, cov = case()
    le, lf = 1.0, 7.0
    loss, _ = compute_loss(out, batch, "nll_jef", lambda_e=le, lambda_f=lf)
    e, v, t = out["energy"].numpy(), out["energy_var"].numpy(), batch[K.ENERGY].numpy()
    e_term = np.mean((t - e) ** 2 / v + np.log(v))
    df = batch[K.FORCES].numpy() - out["forces"].numpy()
    f_term = np.mean([d @ np.linalg.inv(c) @ d + np.log(np.linalg.det(c))
                      for d, c in zip(df, cov, strict=True)])
    assert abs(float(loss) - (le * e_term + lf * f_term)) < 1e-10


def test_nll_e_and_mse_equal_numpy():
    out, batch, _ = case()
    e, v, t = out["energy"].numpy(), out["energy_var"].numpy(), batch[K.ENERGY].numpy()
    df = batch[K.FORCES].numpy() - out["forces"].numpy()
    f_mse = np.mean((df**2).sum(1)) / 3
    loss, _ = compute_loss(out, batch, "nll_e", lambda_e=2.0, lambda_f=3.0)
    assert abs(float(loss) - (2 * np.mean((t - e) ** 2 / v + np.log(v)) + 3 * f_mse)) < 1e-10
    loss, _ = compute_loss(out, batch, "mse", lambda_e=2.0, lambda_f=3.0)
    n = np.array([1, 3])
    assert abs(float(loss) - (2 * np.mean(((t - e) / n) ** 2) + 3 * f_mse)) < 1e-10


def test_beta_nll_weights_each_term_by_its_detached_variance():
    out, batch, cov = case()
    loss, _ = compute_loss(out, batch, "nll_jef", lambda_e=1.0, lambda_f=2.0, beta=0.5)
    e, v, t = out["energy"].numpy(), out["energy_var"].numpy(), batch[K.ENERGY].numpy()
    e_term = np.mean(((t - e) ** 2 / v + np.log(v)) * v**0.5)
    df = batch[K.FORCES].numpy() - out["forces"].numpy()
    f_term = np.mean([(d @ np.linalg.inv(c) @ d + np.log(np.linalg.det(c)))
                      * np.linalg.det(c) ** (0.5 / 3) for d, c in zip(df, cov, strict=True)])
    assert abs(float(loss) - (e_term + 2 * f_term)) < 1e-10


def test_separate_nll_fits_the_means_exactly_as_mse_and_the_variances_by_nll():
    """nll_mode separate: every parameter outside the variance heads gets the MSE loss's
    gradient; the variance heads get the NLL's (and none from MSE)."""
    import ase.build

    from bayesal.bayes_model.data import atoms_to_graph, batch_graphs
    from bayesal.bayes_model.model import ModelConfig, MVEPotential

    torch.manual_seed(0)
    model = MVEPotential(ModelConfig(channels=4, n_layers=2, radial_hidden=8), [1, 6, 8],
                         [-13.6, -1029.5, -2041.3], scale=0.8).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    rng = np.random.default_rng(1)
    graphs = []
    for k in range(3):
        atoms = ase.build.molecule("CH3CH2OH")
        atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
        g = atoms_to_graph(atoms, [1, 6, 8], 5.0, with_labels=False)
        g.energy, g.forces = -4200.0 + k, rng.normal(size=(9, 3))
        graphs.append(g)

    def grads(kind, separate):
        batch = batch_graphs(graphs, dtype=torch.float64)
        model.zero_grad()
        out = model(batch, training=True, detach_variance=separate)
        loss, _ = compute_loss(out, batch, kind, lambda_e=1.0, lambda_f=10.0,
                               separate=separate)
        loss.backward()
        return {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone())
                for n, p in model.named_parameters()}

    mse, separate = grads("mse", False), grads("nll_jef", True)
    variance = ("logvar_head", "cov_heads")
    for name, g in mse.items():
        if name.startswith(variance):
            assert torch.count_nonzero(g) == 0, name
            assert torch.count_nonzero(separate[name]) > 0, name
        else:
            torch.testing.assert_close(separate[name], g, rtol=1e-10, atol=1e-12, msg=name)
    joint = grads("nll_jef", False)  # the seed's joint NLL pulls the trunk elsewhere
    assert not torch.allclose(joint["layers.0.radial.layer0.weight"],
                              mse["layers.0.radial.layer0.weight"])
