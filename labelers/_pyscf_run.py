"""One PySCF calculation: build, converge (recovery ladder), gradient, convert units.

Runs inside an isolated child process (labelers.isolation); imported by the forkserver in
advance so that children start with PySCF loaded. Returns a plain dict.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyscf
from pyscf import dft, gto, lib, scf
from pyscf.data import nist

from bayesal.labelers.guess_store import GuessStore, extrapolation_weights

HARTREE2EV = nist.HARTREE2EV  # eV per Hartree (PySCF's constant)
BOHR = nist.BOHR  # Å per Bohr

# Rungs of the recovery ladder, in order. Each is a fresh SCF object.
LADDER = ("diis", "level_shift", "damping", "newton", "atom_guess")
NEIGHBOURS = 3  # stored geometries combined into one initial guess


def build_mol(symbols, positions, *, basis: str, charge: int, spin: int,
              max_memory_mb: int) -> gto.Mole:
    return gto.M(atom=list(zip(symbols, np.asarray(positions).tolist(), strict=True)),
                 basis=basis, charge=charge, spin=spin, unit="Angstrom",
                 max_memory=max_memory_mb, verbose=0)


def make_scf(mol: gto.Mole, *, method: str, density_fit: bool, auxbasis: str | None,
             dispersion: str, grid_level: int, conv_tol: float, max_cycle: int,
             backend: str = "cpu"):
    """A fresh SCF object: (R|U)HF or (R|U)KS by spin, with DF, grids and dispersion."""
    restricted = mol.spin == 0
    if method == "hf":
        mf = scf.RHF(mol) if restricted else scf.UHF(mol)
    else:
        mf = dft.RKS(mol, xc=method) if restricted else dft.UKS(mol, xc=method)
        mf.grids.level = grid_level
    if density_fit:
        mf = mf.density_fit(auxbasis=auxbasis)
    if dispersion != "none":
        mf.disp = dispersion
    mf.conv_tol = conv_tol
    mf.max_cycle = max_cycle
    if backend == "gpu":
        mf = mf.to_gpu()  # needs gpu4pyscf; the labeler checks before choosing it
    return mf


def _rung(mf, step: str, dm0, dm_last):
    """Configure one rung on a fresh SCF object; returns (scf object, starting density)."""
    if step == "diis":
        return mf, dm0
    if step == "level_shift":
        mf.level_shift = 0.5
        return mf, dm0
    if step == "damping":
        mf.damp = 0.5
        mf.diis_start_cycle = 8
        return mf, dm0
    if step == "newton":  # second-order SCF from the last (unconverged) density
        return mf.newton(), dm_last
    if step == "atom_guess":  # start over from superposed atomic densities
        mf.init_guess = "atom"
        mf.level_shift = 0.2
        return mf, None
    raise ValueError(f"unknown ladder step {step!r}; known: {', '.join(LADDER)}")


def converge(factory: Callable[[], Any], dm0, ladder=LADDER):
    """Walk the recovery ladder until an SCF converges.

    Returns (scf object or None, attempts) where attempts records every rung: step,
    converged, cycles, energy (eV) and seconds.
    """
    attempts: list[dict[str, Any]] = []
    dm_last = dm0
    for step in ladder:
        mf, start = _rung(factory(), step, dm0, dm_last)
        ticks: list[int] = []
        mf.callback = lambda envs, ticks=ticks: ticks.append(1)  # once per (macro) iteration
        t0 = time.perf_counter()
        try:
            energy = mf.kernel(dm0=start)
        except Exception as exc:  # a rung may fail numerically; try the next one
            attempts.append({"step": step, "converged": False, "error": f"{type(exc).__name__}:"
                             f" {exc}"[:300], "seconds": round(time.perf_counter() - t0, 3)})
            continue
        attempts.append({
            "step": step, "converged": bool(mf.converged), "cycles": len(ticks),
            "energy_eV": float(energy) * HARTREE2EV, "seconds": round(time.perf_counter() - t0, 3),
        })
        if mf.converged:
            return mf, attempts
        dm_last = mf.make_rdm1()
    return None, attempts


def _rotate_dm(mol: gto.Mole, guess, restricted: bool):
    u = mol.ao_rotation_matrix(guess.rotation.T)
    dm = np.asarray(guess.dm)
    if restricted != (dm.ndim == 2):
        return None  # stored for another spin treatment
    if dm.shape[-2:] != (mol.nao, mol.nao) or (dm.ndim == 3 and len(dm) != 2):
        return None  # a foreign or damaged file: not this molecule's basis
    if dm.ndim == 2:
        return u @ dm @ u.T
    return np.stack([u @ d @ u.T for d in dm])


def reused_guess(mol, store: GuessStore, numbers, positions, key: str, restricted: bool):
    """Initial density from stored neighbours: the nearest one, plus a first-order
    extrapolation over up to two more when they are near enough. ``None`` if none fits."""
    found = store.neighbours(numbers, positions, k=NEIGHBOURS, exclude=key)
    dms = [_rotate_dm(mol, g, restricted) for g in found]
    pairs = [(g, d) for g, d in zip(found, dms, strict=True) if d is not None]
    if not pairs:
        return None if not found else (None, {"source": "minao", "ignored": [
            g.key for g in found]})
    guesses, dms = zip(*pairs, strict=True)
    coeffs = extrapolation_weights(positions, [g.aligned for g in guesses])
    dm = dms[0] + sum(c * (d - dms[0]) for c, d in zip(coeffs, dms[1:], strict=True))
    info = {"source": "reuse", "from": guesses[0].key, "rmsd_A": round(guesses[0].rmsd, 4),
            "neighbours": len(guesses), "weights": [round(float(c), 4) for c in coeffs]}
    if len(guesses) < len(found):
        info["ignored"] = [g.key for g in found if g not in guesses]
    return dm, info


def calculate(*, symbols: list[str], positions: list[list[float]], numbers: list[int],
              key: str, method: str, basis: str, charge: int, spin: int, dispersion: str,
              density_fit: bool, auxbasis: str | None, grid_level: int, conv_tol: float,
              max_cycle: int, max_memory_mb: int, threads: int, backend: str,
              guess_dir: str | None, settings_hash: str, fail_gradient: bool = False
              ) -> dict[str, Any]:
    """Label one structure. Energies eV, forces eV/Å. Never raises for SCF trouble."""
    t0 = time.perf_counter()
    lib.num_threads(threads)
    positions = np.asarray(positions, dtype=float)
    mol = build_mol(symbols, positions, basis=basis, charge=charge, spin=spin,
                    max_memory_mb=max_memory_mb)
    restricted = spin == 0

    def factory():
        return make_scf(mol, method=method, density_fit=density_fit, auxbasis=auxbasis,
                        dispersion=dispersion, grid_level=grid_level, conv_tol=conv_tol,
                        max_cycle=max_cycle, backend=backend)

    store = GuessStore(guess_dir, settings_hash) if guess_dir else None
    dm0, guess_info = None, {"source": "minao"}
    if store is not None:
        try:
            dm0, guess_info = reused_guess(mol, store, np.asarray(numbers), positions, key,
                                           restricted) or (None, guess_info)
        except Exception as exc:  # a damaged store costs the guess, never the label
            dm0, guess_info = None, {"source": "minao",
                                     "store_error": f"{type(exc).__name__}: {exc}"[:300]}

    mf, attempts = converge(factory, dm0)
    provenance: dict[str, Any] = {
        "code": {"pyscf": pyscf.__version__, "numpy": np.__version__},
        "host": platform.node(), "threads": threads, "backend": backend,
        "reference": "RHF/RKS" if restricted else "UHF/UKS", "guess": guess_info,
        "attempts": attempts, "max_memory_mb": max_memory_mb,
    }
    _dispersion_version(provenance, dispersion)
    cycles = sum(a.get("cycles", 0) for a in attempts)
    base = {"n_scf_cycles": cycles, "provenance": provenance}
    if mf is None:
        return base | {"status": "scf_failed", "wall_s": time.perf_counter() - t0,
                       "error": f"SCF did not converge after {len(attempts)} attempts "
                                f"({', '.join(a['step'] for a in attempts)}; {cycles} cycles)"}
    energy = float(mf.e_tot) * HARTREE2EV
    try:
        if fail_gradient:  # test hook: a converged SCF whose gradient fails
            raise RuntimeError("gradient failure requested by the test hook")
        grad = np.asarray(mf.nuc_grad_method().kernel())
        if not np.isfinite(grad).all():
            raise FloatingPointError("non-finite gradient")
    except Exception as exc:
        return base | {"status": "error", "energy": None, "wall_s": time.perf_counter() - t0,
                       "error": f"gradient failed after a converged SCF: "
                                f"{type(exc).__name__}: {exc}"[:500]}
    forces = -grad * HARTREE2EV / BOHR
    if store is not None:
        store.save(key, np.asarray(numbers), positions, _host(mf.make_rdm1()))
    return base | {"status": "ok", "energy": energy, "forces": forces,
                   "wall_s": time.perf_counter() - t0}


def _host(array) -> np.ndarray:
    """A numpy array from a numpy or CuPy (gpu4pyscf) array."""
    return np.asarray(array.get() if hasattr(array, "get") and not isinstance(array, np.ndarray)
                      else array)


def _dispersion_version(provenance: dict[str, Any], dispersion: str) -> None:
    if dispersion == "none":
        return
    try:
        from importlib.metadata import version

        provenance["code"]["pyscf-dispersion"] = version("pyscf-dispersion")
    except Exception:  # not installed as a distribution: record nothing
        pass
