"""Accuracy and uncertainty-quality metrics of a :class:`Prediction` against labels."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from ase import Atoms
from scipy.stats import ConstantInputWarning, spearmanr

from bayesal.bayes_model.data import labels_of
from bayesal.bayes_model.predict import Prediction

__all__ = ["accuracy_metrics", "reference_labels"]


def reference_labels(images: Sequence[Atoms]) -> tuple[np.ndarray, np.ndarray]:
    """Energies (S,) and concatenated forces (N, 3) stored with labelled images."""
    energies, forces = [], []
    for k, atoms in enumerate(images):
        e, f = labels_of(atoms)
        if e is None or f is None:
            raise ValueError(f"structure {k} has no energy/forces to compare with")
        energies.append(e)
        forces.append(f)
    return np.array(energies), np.concatenate(forces)


def accuracy_metrics(pred: Prediction, images: Sequence[Atoms]) -> dict[str, float]:
    """MAE/RMSE (energy total and per atom, force components), Gaussian NLL with the total
    predictive variance, and Spearman ρ between |error| and predicted std."""
    e_ref, f_ref = reference_labels(images)
    de = pred.energy - e_ref
    df = pred.forces - f_ref
    n = pred.n_atoms.astype(float)
    var_e = pred.energy_var_epi + pred.energy_var_ale
    cov_f = pred.forces_cov_epi + pred.forces_cov_ale
    nll_e = 0.5 * (de**2 / var_e + np.log(2 * math.pi * var_e))
    chol = np.linalg.cholesky(cov_f)
    z = np.linalg.solve(chol, df[..., None])[..., 0]
    logdet = 2 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(1)
    nll_f = 0.5 * ((z**2).sum(1) + logdet + 3 * math.log(2 * math.pi))
    out = {
        "energy_mae": float(np.abs(de).mean()), "energy_rmse": float(np.sqrt((de**2).mean())),
        "energy_mae_per_atom": float(np.abs(de / n).mean()),
        "energy_rmse_per_atom": float(np.sqrt(((de / n) ** 2).mean())),
        "force_mae": float(np.abs(df).mean()), "force_rmse": float(np.sqrt((df**2).mean())),
        "energy_nll": float(nll_e.mean()), "force_nll": float(nll_f.mean()),
        "n_structures": len(e_ref), "n_atoms": int(n.sum()),
    }
    with warnings.catch_warnings():  # constant σ (e.g. a bounded head): ρ undefined, NaN
        warnings.simplefilter("ignore", ConstantInputWarning)
        if len(de) > 2:
            out["energy_spearman"] = float(spearmanr(np.abs(de), np.sqrt(var_e)).statistic)
        out["force_spearman"] = float(spearmanr(
            np.linalg.norm(df, axis=1), np.sqrt(np.trace(cov_f, axis1=1, axis2=2))).statistic)
    return out
