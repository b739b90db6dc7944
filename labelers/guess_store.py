"""Converged density matrices kept on disk, reused as initial guesses for similar structures.

Entries are grouped by labeler settings and by the ordered atomic numbers (same molecule,
same atom order). Stored geometries near the new one (after optimal rotation, Kabsch) give
the guess; their density matrices are rotated into the new orientation with the AO rotation
matrix, which is exact for a rigid rotation (a test checks it against a converged SCF).
With several neighbours the guess is a first-order extrapolation in displacement space
(:func:`extrapolation_weights`): exact to first order along smooth paths such as MD.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Guess", "GuessStore", "extrapolation_weights", "kabsch"]


@dataclass
class Guess:
    key: str  # structure key of the stored geometry
    rmsd: float  # Å, after optimal rotation
    rotation: np.ndarray  # (3, 3): new ≈ (old - c_old) @ rotation.T + c_new
    dm: np.ndarray  # density matrix of the stored geometry (AO basis, its own orientation)
    aligned: np.ndarray | None = None  # (n, 3) stored positions moved onto the new frame


def kabsch(old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, float]:
    """Proper rotation R minimising |R (old_i - c) - (new_i - c')|; returns (R, RMSD in Å)."""
    p = old - old.mean(axis=0)
    q = new - new.mean(axis=0)
    u, _, vt = np.linalg.svd(p.T @ q)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    rmsd = float(np.sqrt(((p @ rot.T - q) ** 2).sum(axis=1).mean()))
    return rot, rmsd


class GuessStore:
    """Directory of converged density matrices for one labeler setting.

    Parameters
    ----------
    root
        Directory (created on demand); shared safely by parallel workers (atomic writes).
    settings_hash
        Only guesses computed with the same settings are used.
    max_rmsd
        Stored geometries farther than this (Å, after rotation) are not used.
    max_candidates
        Most recent entries compared per lookup (bounds the cost of a lookup).
    max_kept
        Entries kept per molecule: saving more deletes the oldest (bounds the disk used).
    """

    def __init__(self, root: str | Path, settings_hash: str, *, max_rmsd: float = 0.5,
                 max_candidates: int = 500, max_kept: int = 2000) -> None:
        self.root = Path(root) / settings_hash[:16]
        self.max_rmsd = max_rmsd
        self.max_candidates = max_candidates
        self.max_kept = max_kept

    def _dir(self, numbers: np.ndarray) -> Path:
        comp = hashlib.sha256(np.asarray(numbers, dtype="<i8").tobytes()).hexdigest()[:16]
        return self.root / comp

    def neighbours(self, numbers: np.ndarray, positions: np.ndarray, k: int = 3,
                   exclude: str | None = None) -> list[Guess]:
        """Up to ``k`` stored geometries of the same molecule within ``max_rmsd``, nearest
        first, each with its rotation onto ``positions`` and its aligned coordinates."""
        folder = self._dir(numbers)
        if not folder.is_dir():
            return []
        files = sorted(folder.glob("*.npz"), key=_mtime, reverse=True)
        found: list[tuple[float, Path, np.ndarray, np.ndarray]] = []
        centre = positions.mean(axis=0)
        for path in files[: self.max_candidates]:
            if path.stem == exclude:
                continue
            try:
                with np.load(path) as data:
                    old = data["positions"]
            except (OSError, ValueError, KeyError):
                continue  # a half-written or foreign file: ignore it
            if old.shape != positions.shape:
                continue
            rot, rmsd = kabsch(old, positions)
            if rmsd <= self.max_rmsd:
                found.append((rmsd, path, rot, (old - old.mean(axis=0)) @ rot.T + centre))
        found.sort(key=lambda t: t[0])
        out = []
        for rmsd, path, rot, aligned in found[:k]:
            try:
                with np.load(path) as data:
                    dm = data["dm"]
            except (OSError, ValueError, KeyError):
                continue  # deleted or damaged since it was listed
            out.append(Guess(key=path.stem, rmsd=rmsd, rotation=rot, dm=dm, aligned=aligned))
        return out

    def nearest(self, numbers: np.ndarray, positions: np.ndarray,
                exclude: str | None = None) -> Guess | None:
        """The closest stored geometry of the same molecule within ``max_rmsd``, if any."""
        found = self.neighbours(numbers, positions, k=1, exclude=exclude)
        return found[0] if found else None

    def save(self, key: str, numbers: np.ndarray, positions: np.ndarray, dm: np.ndarray) -> None:
        """Store a converged density matrix (atomic: readers never see a partial file)."""
        folder = self._dir(numbers)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, positions=positions, dm=dm)
        os.replace(tmp, folder / f"{key}.npz")
        self._prune(folder)

    def _prune(self, folder: Path) -> None:
        files = list(folder.glob("*.npz"))
        if len(files) <= self.max_kept:
            return
        files.sort(key=_mtime)
        for path in files[: len(files) - self.max_kept]:
            path.unlink(missing_ok=True)  # another worker may have pruned it already


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # removed by another worker meanwhile
        return 0.0


def extrapolation_weights(target: np.ndarray, neighbours: list[np.ndarray],
                          limit: float = 2.0) -> np.ndarray:
    """Coefficients c of the first-order model  D(x) ≈ D_0 + Σ_k c_k (D_k - D_0).

    ``target`` and ``neighbours`` are (n, 3) positions in one frame, nearest neighbour first;
    c solves  x - x_0 ≈ Σ_k c_k (x_k - x_0)  in least squares (lightly regularised, clipped to
    ±``limit``), so what the displacements do not explain falls back to the nearest density.
    """
    if len(neighbours) < 2:
        return np.zeros(0)
    x0 = neighbours[0].ravel()
    a = np.stack([n.ravel() - x0 for n in neighbours[1:]], axis=1)  # (3n, k-1)
    b = target.ravel() - x0
    gram = a.T @ a
    ridge = 1e-6 * np.trace(gram) + 1e-12
    c = np.linalg.solve(gram + ridge * np.eye(len(gram)), a.T @ b)
    return np.clip(c, -limit, limit)
