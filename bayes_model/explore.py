"""Candidate generation: Langevin MD with the current model, stopped where it gets unsure.

From each seed structure and temperature a trajectory runs with the posterior's mean
forces; every ``record_every``-th frame becomes a candidate, and the trajectory stops at the
first frame whose largest per-atom epistemic force standard deviation
(max_i sqrt(tr Σ_epi,i), the committee deviation of DP-GEN; the calculator's
``max_force_std_epistemic``, recalibrated like every uncertainty bayesal reports) exceeds
``max_force_std`` — that frame is kept too: it is where the model most needs a label.
With ``stop_on_break`` a trajectory also stops at the first recorded frame that
:func:`bayes_model.stability.check_frame` finds broken against its seed structure (a bond
past 1.5x its starting length, a hydrogen moved to another heavy atom excepted; atoms
closer than half their covalent-radii sum; periodic structures with their images), and
that frame is not kept: an atom that has flown off is beyond every member's cutoff, so the
committee agrees on it (a small max-force-std) while its DFT energy lies eV above the
molecule's and would dominate the energy loss. Frames carry their provenance in ``info``
(temperature_K, md_step, max_force_std, seed_index).
"""

from __future__ import annotations

from collections.abc import Sequence
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
from bayesal.bayes_model.predict import calibrate, structure_results

__all__ = ["Replicas", "Trajectory", "explore", "langevin"]


@dataclass
class Trajectory:
    seed_index: int
    temperature_K: float
    frames: list[Atoms]
    steps_run: int
    stopped: str  # "uncertain", "steps", "broken" (stop_on_break; the frame left out) or
    #               "failed" (the model could not be evaluated)


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


def _langevin_coefficients(dt: float, kT: float, friction: float, masses: np.ndarray):
    """c1..c5 of ASE's Langevin propagator (``Langevin.updatevars``)."""
    sigma = np.sqrt(2 * kT * friction / masses)
    c1 = dt / 2.0 - dt * dt * friction / 8.0
    c2 = dt * friction / 2 - dt * dt * friction * friction / 8.0
    c3 = np.sqrt(dt) * sigma / 2.0 - dt**1.5 * friction * sigma / 8.0
    c5 = dt**1.5 * sigma / (2 * np.sqrt(3))
    return c1, c2, c3, friction / 2.0 * c5, c5


class Replicas:
    """Independent Langevin trajectories stepped together: one batched model call per step
    for all of them (a posterior evaluates a few small structures in about the time of
    one). Each replica follows ASE's :class:`~ase.md.langevin.Langevin` (the propagator of
    Vanden-Eijnden and Ciccotti) with :class:`~ase.constraints.FixCom`, set up as
    :func:`langevin` does and drawing from its own generator in the same order, so a
    replica's trajectory is the one ``langevin(...).run`` gives with that generator (up to
    the float rounding of a batched model call).

    ``atoms[k]``: replica k now; ``results[k]``: the model's results there (energy, forces
    and the recalibrated uncertainties of :func:`~bayesal.bayes_model.predict.structure_results`,
    as :class:`BayesalCalculator` gives them); ``failed[k]``: why the model could not be
    evaluated for it ("" while it could; such a replica is not stepped again)."""

    def __init__(self, posterior, starts: Sequence[Atoms], temperatures_K: Sequence[float],
                 rngs: Sequence[np.random.Generator], *, timestep_fs: float = 0.5,
                 friction_per_fs: float = 0.01, recalibrated: bool = True) -> None:
        if not len(starts) == len(temperatures_K) == len(rngs):
            raise ValueError("one temperature and one generator per start structure")
        self.posterior, self.recalibrated = posterior, recalibrated
        self.dt = timestep_fs * units.fs
        friction = friction_per_fs / units.fs
        self.atoms: list[Atoms] = []
        self.rngs = list(rngs)
        self._coefficients = []
        for start, temperature, rng in zip(starts, temperatures_K, self.rngs, strict=True):
            atoms = Atoms(numbers=start.numbers, positions=start.positions, cell=start.cell,
                          pbc=start.pbc)
            thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
            Stationary(atoms)
            atoms.set_constraint(FixCom())
            self.atoms.append(atoms)
            self._coefficients.append(_langevin_coefficients(
                self.dt, units.kB * temperature, friction, atoms.get_masses()[:, None]))
        self.results: list[dict] = [{} for _ in self.atoms]
        self.failed = [""] * len(self.atoms)
        self._evaluate(list(range(len(self.atoms))))

    def _evaluate(self, which: list[int]) -> None:
        """The model at the current positions of the replicas ``which``, in one call; one
        replica at a time when that call fails, so a replica that exploded fails alone."""
        if not which:
            return
        try:
            raw = self.posterior.predict([self.atoms[k] for k in which])
        except (ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
            if len(which) == 1:
                self.failed[which[0]] = f"model failed ({type(exc).__name__}: {exc})"[:200]
                return
            for k in which:
                self._evaluate([k])
            return
        pred = calibrate(self.posterior, raw) if self.recalibrated else raw
        slices = pred.atom_slices()
        for j, k in enumerate(which):
            self.results[k] = structure_results(pred, j, slices[j])

    def step(self, which: Sequence[int] | None = None) -> None:
        """One MD step of the replicas ``which`` (default: all that have not failed)."""
        which = [k for k in (range(len(self.atoms)) if which is None else which)
                 if not self.failed[k]]
        half = {}
        for k in which:  # first half step in the velocities, full step in the positions
            atoms, (c1, c2, c3, c4, c5) = self.atoms[k], self._coefficients[k]
            masses = atoms.get_masses()[:, None]
            v = atoms.get_velocities()
            xi = self.rngs[k].standard_normal(size=(len(atoms), 3))
            eta = self.rngs[k].standard_normal(size=(len(atoms), 3))
            rnd_pos, rnd_vel = c5 * eta, c3 * xi - c4 * eta
            v += c1 * self.results[k]["forces"] / masses - c2 * v + rnd_vel
            x = atoms.get_positions()
            atoms.set_positions(x + self.dt * v + rnd_pos)  # FixCom holds the centre
            half[k] = ((atoms.get_positions() - x - rnd_pos) / self.dt, rnd_vel, masses)
        self._evaluate(which)
        for k, (v, rnd_vel, masses) in half.items():  # second half step in the velocities
            if self.failed[k]:
                continue
            c1, c2 = self._coefficients[k][:2]
            v += c1 * self.results[k]["forces"] / masses - c2 * v + rnd_vel
            self.atoms[k].set_momenta(v * masses)


def explore(posterior, seeds: Sequence[Atoms], *, temperatures_K: Sequence[float],
            steps: int = 500, timestep_fs: float = 0.5, friction_per_fs: float = 0.01,
            max_force_std_threshold: float = 0.5, record_every: int = 10, seed: int = 0,
            stop_on_break: bool = True) -> list[Trajectory]:
    """One Langevin trajectory per seed structure and temperature (see module doc), all run
    together (:class:`Replicas`: one model call per step), each with its own generator
    spawned from ``seed``, in (seed structure, temperature) order. A trajectory where the
    model cannot be evaluated (positions gone non-finite) stops there ("failed"), the
    others go on."""
    from bayesal.bayes_model.stability import BondReference, check_frame

    if steps < 1 or record_every < 1:
        raise ValueError("steps and record_every must be >= 1")
    runs = [(i, float(t)) for i in range(len(seeds)) for t in temperatures_K]
    if not runs:
        return []
    # the bonds of each seed structure (periodic ones with their images)
    bonds = {i: BondReference.of(seeds[i]) for i in {i for i, _ in runs} if stop_on_break}
    md = Replicas(posterior, [seeds[i] for i, _ in runs], [t for _, t in runs],
                  np.random.default_rng(seed).spawn(len(runs)), timestep_fs=timestep_fs,
                  friction_per_fs=friction_per_fs)
    frames: list[list[Atoms]] = [[] for _ in runs]
    done: dict[int, Trajectory] = {}
    active = list(range(len(runs)))
    for n in range(1, steps + 1):
        md.step(active)
        for k in active:
            i, temperature = runs[k]
            if md.failed[k]:
                done[k] = Trajectory(i, temperature, frames[k], n, "failed")
                continue
            atoms = md.atoms[k]
            sigma = md.results[k]["max_force_std_epistemic"]
            uncertain = not sigma <= max_force_std_threshold  # NaN: uncertain too
            recorded = n % record_every == 0 or uncertain
            if recorded and i in bonds and check_frame(bonds[i], atoms, None, None):
                done[k] = Trajectory(i, temperature, frames[k], n, "broken")
                continue
            if recorded and np.isfinite(atoms.positions).all():
                frames[k].append(Atoms(
                    numbers=atoms.numbers, positions=atoms.positions.copy(), cell=atoms.cell,
                    pbc=atoms.pbc, info={"temperature_K": temperature, "md_step": n,
                                         "max_force_std": sigma, "seed_index": i}))
            if uncertain or n == steps:
                done[k] = Trajectory(i, temperature, frames[k], n,
                                     "uncertain" if uncertain else "steps")
        active = [k for k in active if k not in done]
        if not active:
            break
    return [done[k] for k in range(len(runs))]
