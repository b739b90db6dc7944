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
    XTB = "xtb"  # GFN2-/GFN1-xTB through tblite
    ASE = "ase"  # any ASE calculator (ORCA, CP2K, VASP, GPAW, ...)
    REPLAY = "replay"


# Fields of one kind only: setting them for another is a mistake worth a clear error.
PYSCF_ONLY = ("dispersion", "density_fit", "auxbasis", "grid_level", "backend")
ASE_ONLY = ("calculator", "command", "settings_exclude")


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

    kind: LabelerKind = Field(LabelerKind.PYSCF, description="pyscf (DFT/HF), xtb "
                              "(GFN-xTB through tblite), ase (any ASE calculator) or replay.")
    method: str | None = Field(None, description="Level of theory. pyscf: hf or a LibXC "
                               "functional (default pbe); xtb: gfn2-xtb (default) or "
                               "gfn1-xtb; ase: an optional name for SQL; replay: the files' "
                               "(default pbe).")
    basis: str | None = Field(None, description="pyscf and replay: basis set (default "
                              "def2-svp); ase: an optional name for SQL.")
    dispersion: str = "none"
    charge: int = 0
    multiplicity: int = Field(1, ge=1)
    density_fit: bool = True
    auxbasis: str | None = Field(None, description="Density-fitting basis (None: PySCF's "
                                 "default for the basis).")
    grid_level: int = Field(DEFAULT_GRID_LEVEL, ge=0, le=9)
    backend: PySCFBackend = PySCFBackend.CPU
    calculator: str | None = Field(None, description="kind ase: import path of the ASE "
                                   "calculator class, e.g. ase.calculators.orca.ORCA.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="kind ase: keyword "
                                       "arguments of the calculator; kind xtb: further "
                                       "tblite keywords (accuracy, electronic_temperature, "
                                       "max_iterations, solvation).")
    command: str | None = Field(None, validate_default=True, description="kind ase: the "
                                "command line of the program the calculator runs (ORCA, "
                                "VASP, CP2K); None: ASE's own configuration. Checked on "
                                "PATH before any work.")
    settings_exclude: list[str] = Field(default_factory=list, description="kind ase: "
                                        "calculator parameters that do not change the "
                                        "numbers (left out of the settings hash, beyond "
                                        "paths, threads and verbosity).")
    threads: int = Field(1, ge=1, description="Threads per calculation.")
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0, description="Wall-time limit per "
                             "calculation, s.")
    max_memory_mb: int = Field(DEFAULT_MAX_MEMORY_MB, ge=100, description="Memory per "
                               "calculation, MB (pyscf, xtb; kind ase: not enforced).")
    workers: int = Field(2, ge=1, description="Calculations at once.")
    retries: int = Field(1, ge=0, description="Task retries after a crashed worker.")
    replay_files: list[Path] = Field(default_factory=list, description="kind replay: labelled "
                                     "files whose labels are looked up instead of computed.")

    @model_validator(mode="before")
    @classmethod
    def _defaults_by_kind(cls, data: Any) -> Any:
        """method and basis default by kind; fields of another kind are refused."""
        if not isinstance(data, dict):
            return data
        try:
            kind = LabelerKind(data.get("kind", LabelerKind.PYSCF))
        except ValueError:
            return data  # the field's own validation names the allowed kinds
        data = dict(data)
        if kind in (LabelerKind.PYSCF, LabelerKind.REPLAY):
            data["method"] = data.get("method") or DEFAULT_METHOD
            data["basis"] = data.get("basis") or DEFAULT_BASIS
        elif kind is LabelerKind.XTB:
            data["method"] = data.get("method") or "gfn2-xtb"
        own = {LabelerKind.PYSCF: PYSCF_ONLY, LabelerKind.ASE: ASE_ONLY}
        for other, fields in own.items():
            for name in fields if kind is not other else ():
                if data.get(name) not in (None, [], cls.model_fields[name].default):
                    raise ValueError(f"{name} applies to kind {other.value} only, not "
                                     f"{kind.value}")
        if kind is LabelerKind.XTB and data.get("basis"):
            raise ValueError("basis does not apply to kind xtb (its basis is part of the "
                             "method)")
        if kind not in (LabelerKind.XTB, LabelerKind.ASE) and data.get("parameters"):
            raise ValueError(f"parameters apply to kinds xtb and ase, not {kind.value}")
        if kind is LabelerKind.ASE and not data.get("calculator"):
            raise ValueError("kind ase needs calculator: the import path of an ASE "
                             "calculator class, e.g. ase.calculators.orca.ORCA")
        if kind is LabelerKind.ASE and (data.get("charge") or data.get("multiplicity", 1) != 1):
            raise ValueError("kind ase: give charge and multiplicity in parameters, as the "
                             "calculator names them (ORCA: charge, mult)")
        return data

    @field_validator("method")
    @classmethod
    def _xtb_method(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("kind") is LabelerKind.XTB:
            from bayesal.labelers.ase_labeler import xtb_method

            xtb_method(value)
            return value.lower()
        return value

    @field_validator("calculator")
    @classmethod
    def _calculator_class(cls, value: str | None) -> str | None:
        if value is not None:
            from bayesal.labelers.ase_labeler import load_calculator

            load_calculator(value)  # an unknown or non-calculator class: labeler.calculator
        return value

    @field_validator("command")
    @classmethod
    def _program_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("kind") is LabelerKind.ASE and info.data.get("calculator"):
            from bayesal.labelers.ase_labeler import command_problem, load_calculator

            problem = command_problem(load_calculator(info.data["calculator"]), value)
            if problem:
                raise ValueError(problem)
        return value

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
        if self.kind is LabelerKind.XTB:
            from bayesal.labelers.ase_labeler import xtb_settings

            return xtb_settings(self.method, charge=self.charge,
                                multiplicity=self.multiplicity, parameters=self.parameters)
        if self.kind is LabelerKind.ASE:
            from bayesal.labelers.ase_labeler import ase_settings

            return ase_settings(self.calculator, self.parameters,
                                exclude=self.settings_exclude, method=self.method,
                                basis=self.basis)
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
        if self.kind is LabelerKind.XTB:
            from bayesal.labelers.ase_labeler import XTBLabeler

            return XTBLabeler(self.method, charge=self.charge, multiplicity=self.multiplicity,
                              parameters=self.parameters, threads=self.threads,
                              timeout_s=self.timeout_s, max_memory_mb=self.max_memory_mb)
        if self.kind is LabelerKind.ASE:
            from bayesal.labelers.ase_labeler import AseLabeler

            return AseLabeler(self.calculator, self.parameters, command=self.command,
                              method=self.method, basis=self.basis,
                              settings_exclude=self.settings_exclude, threads=self.threads,
                              timeout_s=self.timeout_s)
        from bayesal.labelers.pyscf_labeler import PySCFLabeler

        return PySCFLabeler(
            self.method, self.basis, charge=self.charge, multiplicity=self.multiplicity,
            dispersion=self.dispersion, density_fit=self.density_fit, auxbasis=self.auxbasis,
            grid_level=self.grid_level, threads=self.threads, max_memory_mb=self.max_memory_mb,
            timeout_s=self.timeout_s, guess_dir=guess_dir, backend=self.backend.value)
