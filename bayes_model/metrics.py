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

__all__ = ["accuracy_metrics", "profile_metrics", "reference_energies", "reference_labels",
           "with_forces"]


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


def reference_energies(images: Sequence[Atoms]) -> np.ndarray:
    """Energies (S,) stored with images that may carry no forces (paths, scans)."""
    energies = []
    for k, atoms in enumerate(images):
        e, _ = labels_of(atoms)
        if e is None:
            raise ValueError(f"structure {k} has no energy to compare with")
        energies.append(e)
    return np.array(energies)


def with_forces(images: Sequence[Atoms]) -> list[int]:
    """Indices of the images that carry reference forces."""
    return [k for k, a in enumerate(images) if labels_of(a)[1] is not None]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    with warnings.catch_warnings():  # constant σ (e.g. a bounded head): ρ undefined, NaN
        warnings.simplefilter("ignore", ConstantInputWarning)
        return float(spearmanr(a, b).statistic)


def accuracy_metrics(pred: Prediction, images: Sequence[Atoms]) -> dict[str, float]:
    """MAE/RMSE (energy total and per atom, force components), Gaussian NLL with the total
    predictive variance, and Spearman ρ between |error| and predicted std. Force metrics
    cover the images that carry forces (none: no force keys; energy-only files such as
    reaction paths and scans get the energy metrics alone)."""
    e_ref = reference_energies(images)
    de = pred.energy - e_ref
    n = pred.n_atoms.astype(float)
    var_e = pred.energy_var_epi + pred.energy_var_ale
    nll_e = 0.5 * (de**2 / var_e + np.log(2 * math.pi * var_e))
    out: dict[str, float] = {
        "energy_mae": float(np.abs(de).mean()), "energy_rmse": float(np.sqrt((de**2).mean())),
        "energy_mae_per_atom": float(np.abs(de / n).mean()),
        "energy_rmse_per_atom": float(np.sqrt(((de / n) ** 2).mean())),
        "energy_nll": float(nll_e.mean()),
        "n_structures": len(e_ref), "n_atoms": int(n.sum()),
    }
    if len(de) > 2:
        out["energy_spearman"] = _spearman(np.abs(de), np.sqrt(var_e))
    forced = with_forces(images)
    if not forced:
        return out
    sub = pred if len(forced) == len(images) else pred.subset(forced)
    _, f_ref = reference_labels([images[k] for k in forced])
    df = sub.forces - f_ref
    cov_f = sub.forces_cov_epi + sub.forces_cov_ale
    chol = np.linalg.cholesky(cov_f)
    z = np.linalg.solve(chol, df[..., None])[..., 0]
    logdet = 2 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(1)
    nll_f = 0.5 * ((z**2).sum(1) + logdet + 3 * math.log(2 * math.pi))
    out.update({"force_mae": float(np.abs(df).mean()),
                "force_rmse": float(np.sqrt((df**2).mean())),
                "force_nll": float(nll_f.mean()),
                "force_spearman": _spearman(np.linalg.norm(df, axis=1),
                                            np.sqrt(np.trace(cov_f, axis1=1, axis2=2)))})
    if len(forced) < len(images):
        out["n_structures_with_forces"] = len(forced)
    return out


def profile_metrics(pred: Prediction, images: Sequence[Atoms]) -> dict[str, float]:
    """How well the model draws an energy profile (a reaction path, a torsion scan, a
    bond-stretch curve, in file order), whatever its constant offset:

    * ``energy_profile_mae`` / ``_rmse``: errors of the relative energies after removing
      each curve's mean (eV);
    * ``energy_range_error``: predicted minus reference span max(E) - min(E) (eV);
    * ``energy_barrier_error``: predicted minus reference barrier, the energy of the
      reference's highest frame relative to the first frame (eV)."""
    ref = reference_energies(images)
    e = pred.energy
    d = (e - e.mean()) - (ref - ref.mean())
    top = int(np.argmax(ref))
    return {"energy_profile_mae": float(np.abs(d).mean()),
            "energy_profile_rmse": float(np.sqrt((d**2).mean())),
            "energy_range_error": float((e.max() - e.min()) - (ref.max() - ref.min())),
            "energy_barrier_error": float((e[top] - e[0]) - (ref[top] - ref[0]))}
