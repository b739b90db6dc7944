"""Converged density matrices kept on disk, reused as initial guesses for similar structures.

Entries are grouped by labeler settings and by the ordered atomic numbers (same molecule,
same atom order). The nearest stored geometry after optimal rotation (Kabsch) gives the
guess; its density matrix is rotated into the new orientation with the AO rotation matrix,
which is exact for a rigid rotation (a test checks it against a converged SCF).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Guess", "GuessStore", "kabsch"]


@dataclass
class Guess:
    key: str  # structure key of the stored geometry
    rmsd: float  # Å, after optimal rotation
    rotation: np.ndarray  # (3, 3): new ≈ (old - c_old) @ rotation.T + c_new
    dm: np.ndarray  # density matrix of the stored geometry (AO basis)


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
    """

    def __init__(self, root: str | Path, settings_hash: str, *, max_rmsd: float = 0.5,
                 max_candidates: int = 500) -> None:
        self.root = Path(root) / settings_hash[:16]
        self.max_rmsd = max_rmsd
        self.max_candidates = max_candidates

    def _dir(self, numbers: np.ndarray) -> Path:
        comp = hashlib.sha256(np.asarray(numbers, dtype="<i8").tobytes()).hexdigest()[:16]
        return self.root / comp

    def nearest(self, numbers: np.ndarray, positions: np.ndarray,
                exclude: str | None = None) -> Guess | None:
        """The closest stored geometry of the same molecule within ``max_rmsd``, if any."""
        folder = self._dir(numbers)
        if not folder.is_dir():
            return None
        files = sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        best: tuple[float, Path, np.ndarray] | None = None
        for path in files[: self.max_candidates]:
            if path.stem == exclude:
                continue
            try:
                with np.load(path) as data:
                    old = data["positions"]
            except (OSError, ValueError, KeyError):
                continue  # a half-written or foreign file: ignore it
            rot, rmsd = kabsch(old, positions)
            if rmsd <= self.max_rmsd and (best is None or rmsd < best[0]):
                best = (rmsd, path, rot)
        if best is None:
            return None
        rmsd, path, rot = best
        with np.load(path) as data:
            dm = data["dm"]
        return Guess(key=path.stem, rmsd=rmsd, rotation=rot, dm=dm)

    def save(self, key: str, numbers: np.ndarray, positions: np.ndarray, dm: np.ndarray) -> None:
        """Store a converged density matrix (atomic: readers never see a partial file)."""
        folder = self._dir(numbers)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, positions=positions, dm=dm)
        os.replace(tmp, folder / f"{key}.npz")
