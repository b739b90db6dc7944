"""ASE calculator with uncertainties: energy, forces, and their epistemic/aleatoric split."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO

from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.io import write

from bayesal.bayes_model.posterior import load_posterior
from bayesal.bayes_model.predict import (
    RAW_SUFFIX,
    UNCERTAINTY_KEYS,
    calibrate,
    file_fields,
    structure_results,
)

__all__ = ["BayesalCalculator", "attach_uncertainty_log", "frame_with_uncertainties"]


class BayesalCalculator(Calculator):
    """``BayesalCalculator(model_dir)``: usable for MD, optimisation, etc.

    ``results`` holds, besides ``energy``/``free_energy`` (eV) and ``forces`` (eV/Å), the
    uncertainties of :data:`bayesal.bayes_model.predict.UNCERTAINTY_KEYS`, the same numbers
    ``bayesal predict`` writes and scoring uses: recalibrated with the model's
    ``calibration.json`` (when it has one; ``recalibrated=False`` turns that off). Watch
    ``forces_std_epistemic`` / ``max_force_std_epistemic`` / ``energy_std_epistemic`` to see
    whether the model extrapolates (the total ``energy_std`` is dominated by the label noise
    the model expects and barely moves); ``energy_std`` / ``forces_std`` say how wrong the
    prediction may be. The same keys with the suffix ``_raw`` hold the values before
    recalibration. ``device`` (auto, cpu, cuda, cuda:K) is where a model read from
    ``model_dir`` runs; a ``posterior`` given ready runs where it was loaded.
    """

    # stress (eV/Å³, ASE's Voigt order) and stress_std_epistemic: cells periodic in all
    # three directions only
    implemented_properties = ["energy", "free_energy", "forces", "stress", *UNCERTAINTY_KEYS]

    def __init__(self, model_dir: str | Path | None = None, *, posterior=None,
                 recalibrated: bool = True, device: str = "cpu", **kwargs) -> None:
        super().__init__(**kwargs)
        if posterior is None:
            if model_dir is None:
                raise ValueError("give a model directory or a posterior")
            posterior = load_posterior(model_dir, device=device)
        self.posterior = posterior
        self.recalibrated = recalibrated

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        raw = self.posterior.predict([self.atoms])
        pred = calibrate(self.posterior, raw) if self.recalibrated else raw
        results = structure_results(pred)
        uncalibrated = structure_results(raw)
        results.update({key + RAW_SUFFIX: uncalibrated[key] for key in UNCERTAINTY_KEYS})
        results["free_energy"] = results["energy"]
        self.results = results


def frame_with_uncertainties(atoms: Atoms, **info) -> Atoms:
    """A copy of ``atoms`` (numbers, positions, cell, pbc; no calculator) carrying its
    calculator's results as ``bayesal predict`` writes them: ``info`` pred_energy,
    pred_energy_std, pred_energy_std_epistemic, ..., ``arrays`` pred_forces,
    pred_forces_std, ..., plus ``info`` given here. ``atoms.calc`` must be a
    :class:`BayesalCalculator`; its results are brought up to date first."""
    atoms.get_forces()  # cached when the positions have not changed
    extra, arrays = file_fields(atoms.calc.results)
    frame = Atoms(numbers=atoms.numbers, positions=atoms.positions.copy(),
                  cell=atoms.cell.copy(), pbc=atoms.pbc.copy(), info={**info, **extra})
    for key, value in arrays.items():
        frame.new_array(key, value.copy())
    return frame


def attach_uncertainty_log(dyn, out: IO[str], *, interval: int = 1) -> Callable[[], None]:
    """Write every ``interval``-th frame of the ASE dynamics ``dyn`` (MD, optimiser) to the
    open text file ``out`` as extended XYZ with the model's energy, forces and
    uncertainties (:func:`frame_with_uncertainties`; ``info`` also has ``step`` and, for
    MD, ``time_fs`` and the instantaneous ``temperature_K``). Read it back with
    ``ase.io.read(path, ":")``. The file is flushed after each frame. Returns the function
    that writes the current frame (to write one off the interval)."""
    atoms = dyn.atoms

    def log() -> None:
        info = {"step": int(dyn.nsteps)}
        if hasattr(dyn, "dt"):
            info.update(time_fs=float(dyn.nsteps * dyn.dt / units.fs),
                        temperature_K=float(atoms.get_temperature()))
        write(out, frame_with_uncertainties(atoms, **info), format="extxyz")
        out.flush()

    dyn.attach(log, interval=interval)
    return log
