"""Training losses: NLL_JEF (default), NLL_E, MSE.

NLL_JEF = λ_E · mean_s[(E_s − μ_s)²/σ²_E,s + log σ²_E,s]
        + λ_F · mean_i[Δf_iᵀ Σ_i⁻¹ Δf_i + log det Σ_i]
NLL_E   = the energy term of NLL_JEF + λ_F · mean_i ‖Δf_i‖²/3
MSE     = λ_E · mean_s[((E_s − μ_s)/N_s)²] + λ_F · mean_i ‖Δf_i‖²/3
(constants such as log 2π dropped). Units: eV, eV/Å.
"""

from __future__ import annotations

import enum

import torch

from bayesal.bayes_model import _keys as K

__all__ = ["LossKind", "compute_loss", "gaussian_nll_energy", "gaussian_nll_forces"]


class LossKind(enum.StrEnum):
    NLL_JEF = "nll_jef"
    NLL_E = "nll_e"
    MSE = "mse"


class NLLMode(enum.StrEnum):
    """How the NLL losses fit means and variances (see :func:`compute_loss`)."""

    SEPARATE = "separate"
    JOINT = "joint"


def gaussian_nll_energy(pred: torch.Tensor, var: torch.Tensor, target: torch.Tensor):
    """Per-structure (E − μ)²/σ² + log σ²."""
    return (target - pred) ** 2 / var + torch.log(var)


def gaussian_nll_forces(pred: torch.Tensor, cov: torch.Tensor, target: torch.Tensor):
    """Per-atom Δfᵀ Σ⁻¹ Δf + log det Σ, through a Cholesky factor of Σ."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):  # non-finite or indefinite: a NaN loss, skipped by training
        return torch.full(cov.shape[:-2], torch.nan, dtype=cov.dtype, device=cov.device)
    diff = (target - pred).unsqueeze(-1)
    z = torch.linalg.solve_triangular(chol, diff, upper=False)
    maha = (z**2).sum(dim=(-2, -1))
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return maha + logdet


def compute_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                 kind: LossKind | str, *, lambda_e: float = 1.0, lambda_f: float = 1.0,
                 beta: float = 0.0, separate: bool = False,
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of a batch and its parts (for logging).

    ``separate``: the NLL sees detached means, and the MSE loss of the means is added, so
    the means are fitted exactly as by the MSE loss and the variances by the NLL (with the
    model's ``detach_variance`` the variance heads also see detached features).
    ``beta`` > 0: β-NLL (Seitzer et al. 2022), each structure's / atom's NLL weighted by its
    stop-gradient variance to the power β (forces: det Σ^(β/3)).
    """
    kind = LossKind(kind)
    energy, forces = batch[K.ENERGY], batch[K.FORCES]
    n_atoms = batch[K.N_ATOMS].to(energy.dtype)
    df = out["forces"] - forces
    mse_e = (((out["energy"] - energy) / n_atoms) ** 2).mean()
    mse_f = (df**2).sum(-1).mean() / 3
    if kind is LossKind.MSE:
        e_term, f_term = mse_e, mse_f
    else:
        e_mean = out["energy"].detach() if separate else out["energy"]
        f_mean = out["forces"].detach() if separate else out["forces"]
        e_nll = gaussian_nll_energy(e_mean, out["energy_var"], energy)
        if beta:
            e_nll = e_nll * out["energy_var"].detach() ** beta
        e_term = e_nll.mean() + (mse_e if separate else 0.0)
        if kind is LossKind.NLL_JEF:
            f_nll = gaussian_nll_forces(f_mean, out["forces_cov"], forces)
            if beta:
                f_nll = f_nll * torch.linalg.det(out["forces_cov"].detach()) ** (beta / 3)
            f_term = f_nll.mean() + (mse_f if separate else 0.0)
        else:
            f_term = mse_f
    loss = lambda_e * e_term + lambda_f * f_term
    parts = {"loss": float(loss.detach()), "energy_term": float(e_term.detach()),
             "force_term": float(f_term.detach())}
    return loss, parts
