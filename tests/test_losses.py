"""Losses against direct numpy evaluations on hand-made cases."""

from __future__ import annotations

import numpy as np
import torch

from bayes_model import _keys as K
from bayes_model.losses import compute_loss


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
