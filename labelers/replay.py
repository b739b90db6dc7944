"""Replay labeler: labels known in advance, served as if computed (benchmarks, tests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
from ase import Atoms

from bayesal.contracts import atoms_hash
from bayesal.labelers.base import Labeler, LabelResult, LabelStatus
from bayesal.labelers.config import replay_settings

__all__ = ["ReplayLabeler"]


class ReplayLabeler(Labeler):
    """Serve the energies and forces stored in labelled files, keyed by structure hash.

    Parameters
    ----------
    files
        extxyz (or ASE-readable) files whose frames carry energy and forces.
    method, basis
        The level of theory of the files (recorded; part of the settings hash).
    energy_key, forces_key
        Where the labels are when not in ASE's calculator (e.g. ``REF_energy``).
    """

    name = "replay"

    def __init__(self, files: Sequence[str | Path], *, method: str = "reference",
                 basis: str = "reference", energy_key: str | None = None,
                 forces_key: str | None = None) -> None:
        self.files = [Path(f) for f in files]
        self._table: dict[str, tuple[float, np.ndarray]] = {}
        for path in self.files:
            for i, atoms in enumerate(ase.io.iread(path, index=":")):
                energy, forces = _labels(atoms, energy_key, forces_key)
                if energy is None or forces is None:
                    raise ValueError(f"{path}, frame {i}: no energy/forces to replay; give "
                                     "--energy-key/--forces-key or use labelled files")
                self._table.setdefault(atoms_hash(atoms), (energy, forces))
        self._settings = replay_settings(self.files, method=method, basis=basis)

    def __len__(self) -> int:
        return len(self._table)

    @property
    def settings(self) -> dict[str, Any]:
        return self._settings

    def _label_one(self, atoms: Atoms) -> LabelResult:
        key = atoms_hash(atoms)
        hit = self._table.get(key)
        if hit is None:
            return LabelResult(
                status=LabelStatus.ERROR.value, wall_s=0.0,
                error=f"structure {key[:16]} ({atoms.get_chemical_formula()}) is not in the "
                      f"replay files ({', '.join(p.name for p in self.files)})",
                provenance={"settings": self.settings})
        energy, forces = hit
        return LabelResult(status=LabelStatus.OK.value, energy=energy, forces=forces.copy(),
                           wall_s=0.0, provenance={"settings": self.settings, "key": key})


def _labels(atoms: Atoms, energy_key: str | None, forces_key: str | None):
    results = getattr(atoms.calc, "results", None) or {}
    ek, fk = energy_key or "energy", forces_key or "forces"
    energy = results.get(ek, atoms.info.get(ek))
    forces = results.get(fk, atoms.arrays.get(fk))
    if forces is None and len(atoms) == 1:
        forces = np.zeros((1, 3))
    return (None if energy is None else float(energy),
            None if forces is None else np.array(forces, dtype=float))
