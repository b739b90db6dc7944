"""DFT/HF labels from PySCF, isolated per calculation and surviving SCF trouble."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

from ase import Atoms
from ase.data import chemical_symbols

from bayesal.contracts import atoms_hash
from bayesal.labelers._identity import spin_problem
from bayesal.labelers.base import Labeler, LabelResult, isolated_result
from bayesal.labelers.config import (
    DEFAULT_BASIS,
    DEFAULT_GRID_LEVEL,
    DEFAULT_MAX_MEMORY_MB,
    DEFAULT_METHOD,
    DEFAULT_TIMEOUT_S,
    PySCFBackend,
    pyscf_settings,
)
from bayesal.labelers.isolation import run_isolated

__all__ = ["DISPERSIONS", "PySCFLabeler", "gpu_available"]

DISPERSIONS = ("none", "d3bj", "d3zero", "d3bjm", "d3zerom", "d3op", "d4")
COMMON_FUNCTIONALS = "hf, pbe, pbe0, b3lyp, blyp, tpss, r2scan, wb97x-d, wb97m-v, m06-2x"
COMMON_BASES = "sto-3g, 6-31g*, def2-svp, def2-tzvp, cc-pvdz, cc-pvtz, aug-cc-pvdz"


def gpu_available() -> bool:
    """Whether gpu4pyscf is importable (the GPU backend's requirement)."""
    try:
        import gpu4pyscf  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=64)
def _check_method(method: str) -> None:
    if method == "hf":
        return
    from pyscf.dft import libxc

    try:
        libxc.parse_xc(method)
    except Exception:
        raise ValueError(f"unknown functional {method!r}: use hf or a functional that PySCF/LibXC "
                         f"knows, e.g. {COMMON_FUNCTIONALS}") from None


@functools.lru_cache(maxsize=64)
def _check_basis_name(basis: str) -> None:
    import warnings

    from pyscf.gto import basis as pyscf_basis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PySCF's advice to install basis-set-exchange
        _load_basis_or_raise(pyscf_basis, basis)


def _load_basis_or_raise(pyscf_basis, basis: str) -> None:
    try:
        pyscf_basis.load(basis, "H")
    except Exception:
        try:  # a basis without hydrogen (rare) still has carbon
            pyscf_basis.load(basis, "C")
        except Exception:
            raise ValueError(f"unknown basis set {basis!r}; PySCF knows e.g. {COMMON_BASES} "
                             "(see pyscf.gto.basis for all)") from None


@functools.lru_cache(maxsize=512)
def _has_basis(basis: str, symbol: str) -> bool:
    import warnings

    from pyscf.gto import basis as pyscf_basis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return bool(pyscf_basis.load(basis, symbol))
        except Exception:
            return False


@functools.lru_cache(maxsize=64)
def _check_dispersion(method: str, dispersion: str) -> None:
    if dispersion not in DISPERSIONS:
        raise ValueError(f"unknown dispersion {dispersion!r}; use one of {', '.join(DISPERSIONS)}")
    if dispersion == "none":
        return
    from pyscf import dft, gto, scf

    mol = gto.M(atom="H 0 0 0; H 0 0 0.74", basis="sto-3g", verbose=0)
    mf = scf.RHF(mol) if method == "hf" else dft.RKS(mol, xc=method)
    mf.disp = dispersion
    try:
        mf.get_dispersion()
    except Exception as exc:
        raise ValueError(f"dispersion {dispersion!r} has no parameters for {method!r} "
                         f"({exc}); choose another dispersion or none") from None


class PySCFLabeler(Labeler):
    """Energies and forces from PySCF (HF or any DFT functional).

    Singlets run restricted (RHF/RKS), other multiplicities unrestricted (UHF/UKS). Each
    calculation runs in its own process under ``timeout_s``; SCF trouble walks a recovery
    ladder (DIIS -> level shift -> damping -> second-order SCF -> atomic guess) before the
    label is recorded as ``scf_failed``. Energies in eV and forces in eV/Å, converted with
    PySCF's own constants.

    Parameters
    ----------
    method
        ``"hf"`` or a functional name (``"pbe"``, ``"b3lyp"``, ...).
    basis
        Basis set name known to PySCF.
    charge, multiplicity
        Total charge and spin multiplicity 2S+1 of every structure.
    dispersion
        ``"none"``, ``"d3bj"``, ``"d3zero"``, ``"d4"``, ... via pyscf-dispersion.
    density_fit
        Density fitting (RI-J/K), on by default; ``auxbasis`` None picks PySCF's default.
    grid_level
        DFT integration grid level (0-9).
    conv_tol, max_cycle
        SCF energy convergence threshold (Hartree) and cycles per ladder rung.
    threads
        OpenMP threads of each calculation.
    max_memory_mb
        Memory PySCF may use per calculation (PySCF's ``max_memory``).
    timeout_s
        Wall-time limit per calculation; ``None`` for none.
    guess_dir
        Directory for converged density matrices reused as initial guesses for similar
        structures (``None``: off).
    backend
        ``"cpu"``, ``"gpu"`` (gpu4pyscf) or ``"auto"`` (GPU when gpu4pyscf imports).
    """

    name = "pyscf"

    def __init__(
        self,
        method: str = DEFAULT_METHOD,
        basis: str = DEFAULT_BASIS,
        *,
        charge: int = 0,
        multiplicity: int = 1,
        dispersion: str = "none",
        density_fit: bool = True,
        auxbasis: str | None = None,
        grid_level: int = DEFAULT_GRID_LEVEL,
        conv_tol: float = 1e-9,
        max_cycle: int = 100,
        threads: int = 1,
        max_memory_mb: int = DEFAULT_MAX_MEMORY_MB,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        guess_dir: str | Path | None = None,
        backend: str = "cpu",
    ) -> None:
        self._method = method.lower()
        self._basis = basis.lower()
        self.dispersion = (dispersion or "none").lower()
        _check_method(self._method)
        _check_basis_name(self._basis)
        _check_dispersion(self._method, self.dispersion)
        if multiplicity < 1:
            raise ValueError(f"multiplicity must be >= 1 (2S+1), got {multiplicity}")
        if not 0 <= grid_level <= 9:
            raise ValueError(f"grid_level must be 0..9, got {grid_level}")
        if threads < 1 or max_cycle < 1 or max_memory_mb < 100:
            raise ValueError("threads and max_cycle must be >= 1 and max_memory_mb >= 100")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive (or None), got {timeout_s}")
        if backend not in set(PySCFBackend):
            raise ValueError(f"backend must be cpu, gpu or auto, got {backend!r}")
        if backend == PySCFBackend.GPU and not gpu_available():
            raise ValueError("backend='gpu' needs gpu4pyscf (pip install gpu4pyscf-cuda12x); "
                             "use backend='cpu' or 'auto'")
        if backend == PySCFBackend.AUTO:
            backend = PySCFBackend.GPU if gpu_available() else PySCFBackend.CPU
        self.backend = PySCFBackend(backend).value
        self.charge, self.multiplicity = int(charge), int(multiplicity)
        self.density_fit, self.auxbasis = bool(density_fit), auxbasis
        self.grid_level, self.conv_tol, self.max_cycle = int(grid_level), conv_tol, max_cycle
        self.threads, self.max_memory_mb, self.timeout_s = threads, max_memory_mb, timeout_s
        self.guess_dir = None if guess_dir is None else str(Path(guess_dir))
        self._fail_gradient = False  # test hook

    @property
    def memory_limit_mb(self) -> int | None:
        """The enforced ceiling of a calculation's address space: PySCF treats
        ``max_memory_mb`` as a target for its large arrays, so the process gets twice that
        plus 1 GB for the interpreter, libraries and thread buffers (none on GPU, where the
        driver maps far more address space than it uses)."""
        if self.backend == PySCFBackend.GPU:
            return None
        return 2 * self.max_memory_mb + 1024 + 128 * self.threads

    @property
    def settings(self) -> dict[str, Any]:
        return pyscf_settings(self._method, self._basis, charge=self.charge,
                              multiplicity=self.multiplicity, dispersion=self.dispersion,
                              density_fit=self.density_fit, auxbasis=self.auxbasis,
                              grid_level=self.grid_level)

    def problem(self, atoms: Atoms) -> str | None:
        geometry = super().problem(atoms)
        if geometry:
            return geometry
        if atoms.pbc.any():
            return ("periodic cell: the PySCF labeler computes molecules only; set "
                    "pbc=False (the cell is then ignored)")
        spin = spin_problem(atoms, self.charge, self.multiplicity)
        if spin:
            return spin
        missing = sorted({chemical_symbols[z] for z in set(atoms.numbers.tolist())
                          if not _has_basis(self._basis, chemical_symbols[z])})
        if missing:
            return f"basis {self._basis} has no functions for {', '.join(missing)}"
        return None

    def _payload(self, atoms: Atoms) -> dict[str, Any]:
        return {
            "symbols": atoms.get_chemical_symbols(), "positions": atoms.positions.tolist(),
            "numbers": atoms.numbers.tolist(), "key": atoms_hash(atoms),
            "method": self._method, "basis": self._basis, "charge": self.charge,
            "spin": self.multiplicity - 1, "dispersion": self.dispersion,
            "density_fit": self.density_fit, "auxbasis": self.auxbasis,
            "grid_level": self.grid_level, "conv_tol": self.conv_tol,
            "max_cycle": self.max_cycle, "max_memory_mb": self.max_memory_mb,
            "threads": self.threads, "backend": self.backend, "guess_dir": self.guess_dir,
            "settings_hash": self.settings_hash, "fail_gradient": self._fail_gradient,
        }

    def _label_one(self, atoms: Atoms) -> LabelResult:
        t0 = time.perf_counter()
        outcome = run_isolated("bayesal.labelers._pyscf_run:calculate", self._payload(atoms),
                               timeout=self.timeout_s, threads=self.threads,
                               memory_mb=self.memory_limit_mb)
        base_prov = {"settings": self.settings, "host": os.uname().nodename}
        return isolated_result(outcome, base_prov, time.perf_counter() - t0)
