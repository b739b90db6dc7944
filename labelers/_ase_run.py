"""One ASE-calculator calculation, run inside an isolated child process (labelers.isolation).

The worker imports this module and the calculator's module before it forks, so a child
starts with both loaded. The child works in its own scratch folder (the worker deletes it
afterwards) and returns a plain dict: status, energy (eV), forces (eV/Å), error.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import CalculationFailed, SCFError

from bayesal.labelers.ase_labeler import _SCF_TROUBLE, _template_section, load_calculator

__all__ = ["calculate"]


def _with_command(cls, kwargs: dict[str, Any], command: str) -> dict[str, Any]:
    """Hand ``command`` to the calculator the way ASE expects it: a GenericFileIOCalculator
    reads its program from ASE's configuration (set here, in this child only); the others
    take a ``command`` keyword."""
    from ase.calculators.genericfileio import GenericFileIOCalculator

    if issubclass(cls, GenericFileIOCalculator):
        from ase.config import cfg

        section = _template_section(cls)
        if section not in cfg.parser:
            cfg.parser.add_section(section)
        cfg.parser[section]["command"] = command
        return kwargs
    return kwargs | {"command": command}


def _failure(status: str, exc: BaseException) -> dict[str, Any]:
    text = f"{type(exc).__name__}: {exc}".strip()
    return {"status": status, "error": text[:2000]}


def calculate(*, calculator: str, parameters: dict[str, Any], command: str | None,
              numbers: list[int], positions: list, cell: list, pbc: list[bool]) -> dict:
    cls = load_calculator(calculator)
    os.chdir(tempfile.gettempdir())  # the worker's per-calculation scratch folder
    kwargs = dict(parameters)
    if command:
        kwargs = _with_command(cls, kwargs, command)
    atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
    t0 = time.perf_counter()
    try:
        atoms.calc = cls(**kwargs)
        energy = float(atoms.get_potential_energy())
        forces = np.array(atoms.get_forces(), dtype=float)
    except SCFError as exc:
        return _failure("scf_failed", exc)
    except CalculationFailed as exc:  # tblite: "SCF not converged in 250 cycles"
        return _failure("scf_failed" if _SCF_TROUBLE.search(str(exc)) else "error", exc)
    except Exception as exc:  # any other failure of the calculator or its program
        return _failure("error", exc)
    if not np.isfinite(energy) or not np.isfinite(forces).all():
        return {"status": "error", "error": "the calculator returned non-finite energy or "
                "forces"}
    if forces.shape != (len(atoms), 3):
        return {"status": "error", "error": f"the calculator returned forces of shape "
                f"{forces.shape} for {len(atoms)} atoms"}
    return {"status": "ok", "energy": energy, "forces": forces,
            "provenance": {"calculation_s": time.perf_counter() - t0,
                           "calculator_class": f"{cls.__module__}.{cls.__qualname__}"}}

