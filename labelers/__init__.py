"""Labelers: DFT (PySCF), xTB (tblite), any ASE calculator and replayed labels behind one
protocol. No Prefect here.

    from bayesal.labelers import PySCFLabeler
    result = PySCFLabeler("pbe", "def2-svp", dispersion="d3bj").label(atoms)
    result.energy, result.forces      # eV, eV/Å

    LabelerConfig(method="hf", basis="sto-3g").build()  # from a campaign's labeler: section
"""

from bayesal.labelers.ase_labeler import AseLabeler, XTBLabeler
from bayesal.labelers.base import (
    Labeler,
    LabelerInputError,
    LabelResult,
    LabelStatus,
    settings_hash,
)
from bayesal.labelers.config import LabelerConfig, LabelerKind, PySCFBackend
from bayesal.labelers.pyscf_labeler import DISPERSIONS, PySCFLabeler, gpu_available
from bayesal.labelers.replay import ReplayLabeler

__all__ = [
    "DISPERSIONS",
    "AseLabeler",
    "LabelResult",
    "LabelStatus",
    "Labeler",
    "LabelerConfig",
    "LabelerInputError",
    "LabelerKind",
    "PySCFBackend",
    "PySCFLabeler",
    "ReplayLabeler",
    "XTBLabeler",
    "gpu_available",
    "settings_hash",
]
