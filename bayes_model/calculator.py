"""ASE calculator with uncertainties: energy, forces, and their epistemic/aleatoric split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from bayesal.bayes_model.posterior import load_posterior

__all__ = ["BayesalCalculator"]


class BayesalCalculator(Calculator):
    """``BayesalCalculator(model_dir)``: usable for MD, optimisation, etc.

    ``results`` holds, besides ``energy``/``free_energy`` (eV) and ``forces`` (eV/Å):
    ``energy_std`` (total), ``energy_std_epistemic``, ``energy_std_aleatoric`` (eV);
    ``forces_std`` (N, 3, total), ``forces_std_epistemic``, ``forces_std_aleatoric`` (eV/Å);
    and the full per-atom covariances ``forces_cov_epistemic``/``forces_cov_aleatoric``.
    """

    implemented_properties = ["energy", "free_energy", "forces", "energy_std", "forces_std"]

    def __init__(self, model_dir: str | Path | None = None, *, posterior=None, **kwargs) -> None:
        super().__init__(**kwargs)
        if posterior is None:
            if model_dir is None:
                raise ValueError("give a model directory or a posterior")
            posterior = load_posterior(model_dir)
        self.posterior = posterior

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        p = self.posterior.predict([self.atoms])
        epi_f = np.sqrt(np.diagonal(p.forces_cov_epi, axis1=1, axis2=2))
        ale_f = np.sqrt(np.diagonal(p.forces_cov_ale, axis1=1, axis2=2))
        self.results = {
            "energy": float(p.energy[0]), "free_energy": float(p.energy[0]),
            "forces": p.forces.copy(),
            "energy_std": float(p.energy_std[0]),
            "energy_std_epistemic": float(np.sqrt(p.energy_var_epi[0])),
            "energy_std_aleatoric": float(np.sqrt(p.energy_var_ale[0])),
            "forces_std": p.forces_std, "forces_std_epistemic": epi_f,
            "forces_std_aleatoric": ale_f,
            "forces_cov_epistemic": p.forces_cov_epi, "forces_cov_aleatoric": p.forces_cov_ale,
        }
