"""Tiny ASE calculators for the ``kind: ase`` labeler tests: a good one and one per failure.

Workers import this module by name (``ase_test_calculators.Raises``), so tests put this
folder on PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
from ase.calculators.calculator import Calculator, SCFError, all_changes


class Springs(Calculator):
    """E = k/2 sum |r_i - r_0|^2 about the first atom's position: forces -k (r_i - r_0)."""

    implemented_properties = ["energy", "forces"]
    default_parameters = {"k": 1.0}

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        d = self.atoms.positions - self.atoms.positions.mean(axis=0)
        k = float(self.parameters.k)
        self.results = {"energy": 0.5 * k * float((d**2).sum()), "forces": -k * d}


class Raises(Springs):
    def calculate(self, *args, **kwargs):
        raise RuntimeError("the program stopped with a broken input file")


class NotConverged(Springs):
    def calculate(self, *args, **kwargs):
        raise SCFError("SCF did not converge after 500 iterations")


class Hangs(Springs):
    def calculate(self, *args, **kwargs):
        time.sleep(120)


class Segfaults(Springs):
    def calculate(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGSEGV)


class NaNForces(Springs):
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results["forces"] = np.full_like(self.results["forces"], np.nan)


class WritesFiles(Springs):
    """Writes into its working directory, as file-based calculators do."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        with open("calc.out", "w") as fh:
            fh.write("output of a file-based program\n")
        super().calculate(atoms, properties, system_changes)


def not_a_calculator(**kwargs):
    raise AssertionError("a configuration must never call a function")
