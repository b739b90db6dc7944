"""Labelers: DFT (PySCF) and replayed labels behind one protocol. No Prefect here.

    from bayesal.labelers import PySCFLabeler
    result = PySCFLabeler("pbe", "def2-svp", dispersion="d3bj").label(atoms)
    result.energy, result.forces      # eV, eV/Å
"""

from bayesal.labelers.base import (
    Labeler,
    LabelerInputError,
    LabelResult,
    LabelStatus,
    settings_hash,
)
from bayesal.labelers.pyscf_labeler import DISPERSIONS, PySCFLabeler, gpu_available
from bayesal.labelers.replay import ReplayLabeler

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
]
