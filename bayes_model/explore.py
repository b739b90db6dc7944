"""Candidate generation: Langevin MD with the current model, stopped where it gets unsure.

From each seed structure and temperature a trajectory runs with the posterior's mean
forces; every ``record_every``-th frame becomes a candidate, and the trajectory stops at the
first frame whose largest per-atom epistemic force standard deviation
(max_i sqrt(tr Σ_epi,i), the committee deviation of DP-GEN; the calculator's
``max_force_std_epistemic``, recalibrated like every uncertainty bayesal reports) exceeds
``max_force_std`` — that frame is kept too: it is where the model most needs a label.
Frames carry their provenance in ``info`` (temperature_K, md_step, max_force_std,
seed_index).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms, units
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary

try:  # ASE >= 3.28
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # pragma: no cover
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

from bayesal.bayes_model.calculator import BayesalCalculator

__all__ = ["Trajectory", "explore", "langevin"]


@dataclass
class Trajectory:
    seed_index: int
    temperature_K: float
    frames: list[Atoms]
    steps_run: int
    stopped: str  # "uncertain" or "steps"


def langevin(atoms: Atoms, posterior, *, temperature_K: float, timestep_fs: float = 0.5,
             friction_per_fs: float = 0.01, rng: np.random.Generator) -> Langevin:
    """Langevin dynamics of ``atoms`` (changed in place) on the posterior's mean forces:
    momenta drawn at ``temperature_K``, no centre-of-mass drift."""
    atoms.calc = BayesalCalculator(posterior=posterior)
    thermalize_momenta(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)
    atoms.set_constraint(FixCom())  # (Langevin's own fixcm is deprecated)
    return Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature_K,
                    friction=friction_per_fs / units.fs, fixcm=False, rng=rng)


def explore(posterior, seeds: Sequence[Atoms], *, temperatures_K: Sequence[float],
            steps: int = 500, timestep_fs: float = 0.5, friction_per_fs: float = 0.01,
            max_force_std_threshold: float = 0.5, record_every: int = 10, seed: int = 0,
            on_trajectory: Callable[[Trajectory], None] | None = None) -> list[Trajectory]:
    """Run one Langevin trajectory per seed structure and temperature (see module doc)."""
    if steps < 1 or record_every < 1:
        raise ValueError("steps and record_every must be >= 1")
    rng = np.random.default_rng(seed)
    out = []
    for i, start in enumerate(seeds):
        for temperature in temperatures_K:
            atoms = Atoms(numbers=start.numbers, positions=start.positions, cell=start.cell,
                          pbc=start.pbc)
            dyn = langevin(atoms, posterior, temperature_K=temperature,
                           timestep_fs=timestep_fs, friction_per_fs=friction_per_fs, rng=rng)
            frames, stopped, n = [], "steps", 0
            for n in range(1, steps + 1):
                dyn.run(1)
                sigma = atoms.calc.results["max_force_std_epistemic"]
                uncertain = sigma > max_force_std_threshold or not np.isfinite(sigma)
                if n % record_every == 0 or uncertain:
                    frame = Atoms(numbers=atoms.numbers, positions=atoms.positions.copy(),
                                  cell=atoms.cell, pbc=atoms.pbc,
                                  info={"temperature_K": float(temperature), "md_step": n,
                                        "max_force_std": sigma, "seed_index": i})
                    if np.isfinite(atoms.positions).all():
                        frames.append(frame)
                if uncertain:
                    stopped = "uncertain"
                    break
            traj = Trajectory(i, float(temperature), frames, n, stopped)
            if on_trajectory is not None:
                on_trajectory(traj)
            out.append(traj)
    return out
