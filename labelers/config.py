"""A labeler's configuration: one set of defaults for the library, the CLI and campaigns.

``LabelerConfig`` is the campaign YAML's ``labeler:`` section, what ``bayesal label`` builds
from its options and what the library's labelers default to. Its ``settings`` (the level of
theory) and their hash are computed from the configuration alone, without building a
labeler, and equal those of the labeler :meth:`LabelerConfig.build` returns::

    cfg = LabelerConfig(method="pbe", basis="def2-svp", dispersion="d3bj")
    cfg.settings_hash                      # the database key of these labels
    labeler = cfg.build(guess_dir="scf-guesses")
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from bayesal.contracts import settings_hash

__all__ = ["DEFAULT_BASIS", "DEFAULT_METHOD", "DEFAULT_TIMEOUT_S", "LabelerConfig",
           "LabelerKind", "PySCFBackend", "pyscf_settings", "replay_settings",
           "resolve_files"]

DEFAULT_METHOD = "pbe"
DEFAULT_BASIS = "def2-svp"
DEFAULT_TIMEOUT_S = 3600.0
DEFAULT_MAX_MEMORY_MB = 4000
DEFAULT_GRID_LEVEL = 3


class LabelerKind(enum.StrEnum):
    PYSCF = "pyscf"
    REPLAY = "replay"


class PySCFBackend(enum.StrEnum):
    CPU = "cpu"
    GPU = "gpu"  # gpu4pyscf
    AUTO = "auto"  # GPU when gpu4pyscf imports


def pyscf_settings(method: str, basis: str, *, charge: int, multiplicity: int,
                   dispersion: str, density_fit: bool, auxbasis: str | None,
                   grid_level: int) -> dict[str, Any]:
    """The level of theory of a PySCF label: what makes two labels comparable (not threads,
    limits, guesses or backend, which do not change the numbers)."""
    method = method.lower()
    return {
        "labeler": LabelerKind.PYSCF.value, "method": method, "basis": basis.lower(),
        "charge": int(charge), "multiplicity": int(multiplicity),
        "dispersion": (dispersion or "none").lower(), "density_fit": bool(density_fit),
        "auxbasis": auxbasis, "grid_level": int(grid_level) if method != "hf" else None,
    }


def file_digest(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def replay_settings(files: Sequence[str | Path], *, method: str,
                    basis: str) -> dict[str, Any]:
    """The settings of replayed labels: the files' level of theory and their contents."""
    return {"labeler": LabelerKind.REPLAY.value, "method": method.lower(),
            "basis": basis.lower(), "data": sorted(file_digest(p) for p in files)}


def resolve_files(paths: list[Path], info: ValidationInfo) -> list[Path]:
    """Validator helper: paths made absolute against the validation context's ``base_dir``
    (the YAML file's folder) and required to exist."""
    base = (info.context or {}).get("base_dir")
    out = []
    for p in paths:
        p = Path(p).expanduser()
        if not p.is_absolute() and base is not None:
            p = Path(base) / p
        if not p.is_file():
            raise ValueError(f"file {p} does not exist")
        out.append(p)
    return out


class LabelerConfig(BaseModel):
    """How structures are labelled (the campaign YAML's ``labeler:`` section)."""

    model_config = ConfigDict(extra="forbid")

    kind: LabelerKind = LabelerKind.PYSCF
    method: str = Field(DEFAULT_METHOD, description="PySCF method (hf or a LibXC "
                        "functional); kind replay: the files' level of theory.")
    basis: str = DEFAULT_BASIS
    dispersion: str = "none"
    charge: int = 0
    multiplicity: int = Field(1, ge=1)
    density_fit: bool = True
    auxbasis: str | None = Field(None, description="Density-fitting basis (None: PySCF's "
                                 "default for the basis).")
    grid_level: int = Field(DEFAULT_GRID_LEVEL, ge=0, le=9)
    backend: PySCFBackend = PySCFBackend.CPU
    threads: int = Field(1, ge=1, description="Threads per calculation.")
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0, description="Wall-time limit per "
                             "calculation, s.")
    max_memory_mb: int = Field(DEFAULT_MAX_MEMORY_MB, ge=100, description="Memory per "
                               "calculation, MB.")
    workers: int = Field(2, ge=1, description="Calculations at once.")
    retries: int = Field(1, ge=0, description="Task retries after a crashed worker.")
    replay_files: list[Path] = Field(default_factory=list, description="kind replay: labelled "
                                     "files whose labels are looked up instead of computed.")

    @field_validator("replay_files")
    @classmethod
    def _files_exist(cls, value: list[Path], info: ValidationInfo) -> list[Path]:
        return resolve_files(value, info)

    @model_validator(mode="after")
    def _replay_needs_files(self) -> LabelerConfig:
        if self.kind is LabelerKind.REPLAY and not self.replay_files:
            raise ValueError("kind replay needs replay_files")
        return self

    @property
    def settings(self) -> dict[str, Any]:
        """The level of theory: equal to ``self.build().settings``."""
        if self.kind is LabelerKind.REPLAY:
            return replay_settings(self.replay_files, method=self.method, basis=self.basis)
        return pyscf_settings(self.method, self.basis, charge=self.charge,
                              multiplicity=self.multiplicity, dispersion=self.dispersion,
                              density_fit=self.density_fit, auxbasis=self.auxbasis,
                              grid_level=self.grid_level)

    @property
    def settings_hash(self) -> str:
        return settings_hash(self.settings)

    def build(self, guess_dir: str | Path | None = None):
        """The labeler this configuration describes (``guess_dir``: SCF guesses, PySCF)."""
        if self.kind is LabelerKind.REPLAY:
            from bayesal.labelers.replay import ReplayLabeler

            return ReplayLabeler(self.replay_files, method=self.method, basis=self.basis)
        from bayesal.labelers.pyscf_labeler import PySCFLabeler

        return PySCFLabeler(
            self.method, self.basis, charge=self.charge, multiplicity=self.multiplicity,
            dispersion=self.dispersion, density_fit=self.density_fit, auxbasis=self.auxbasis,
            grid_level=self.grid_level, threads=self.threads, max_memory_mb=self.max_memory_mb,
            timeout_s=self.timeout_s, guess_dir=guess_dir, backend=self.backend.value)
