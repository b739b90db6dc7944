"""Labelers: DFT (PySCF) and replayed labels behind one protocol. No Prefect here.

    from labelers import PySCFLabeler
    result = PySCFLabeler("pbe", "def2-svp", dispersion="d3bj").label(atoms)
    result.energy, result.forces      # eV, eV/Å
"""

from labelers._identity import structure_key
from labelers.base import Labeler, LabelerInputError, LabelResult, LabelStatus, settings_hash
from labelers.pyscf_labeler import DISPERSIONS, PySCFLabeler, gpu_available
from labelers.replay import ReplayLabeler

__all__ = [
    "DISPERSIONS",
    "LabelResult",
    "LabelStatus",
    "Labeler",
    "LabelerInputError",
    "PySCFLabeler",
    "ReplayLabeler",
    "gpu_available",
    "settings_hash",
    "structure_key",
]
