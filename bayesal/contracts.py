"""Contracts every part of bayesal shares, defined once.

This module depends on nothing of bayesal (only the standard library and numpy), so the
libraries (``bayes_model``, ``labelers``, ``db``), which must not import each other, can all
import it (tests/test_architecture.py allows exactly this module):

* the identity of a structure (:func:`structure_hash`) and of a level of theory
  (:func:`settings_hash`): the database's uniqueness keys, computed the same way by imports,
  labelers and the store;
* the minimum interatomic distance of a sane structure and :func:`closest_pair`;
* the outcome of a labeling calculation (:class:`LabelStatus`, the values the database
  stores);
* the names of the acquisition components stored with every score;
* the keys of a round's metrics (:class:`RoundMetric`, :func:`metric_on_test`), written by the
  campaign and read by its report, ``bayesal status`` and the dashboard;
* :func:`die_with_parent` for helper processes (labeler workers, ensemble members).
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "ACQUISITION_COMPONENTS",
    "MIN_DISTANCE",
    "ROUND_ANGSTROM",
    "STEP_SECONDS",
    "LabelStatus",
    "RoundMetric",
    "atoms_hash",
    "closest_pair",
    "die_with_parent",
    "metric_on_test",
    "parent_death_hook",
    "pbc_flags",
    "settings_hash",
    "split_metric_on_test",
    "strip_control",
    "structure_hash",
]

ROUND_ANGSTROM = 1e-6  # Å, resolution of the identity hash
MIN_DISTANCE = 0.1  # Å, atoms closer than this are a broken structure

# Per-structure acquisition components (bayes_model.acquisition computes them, the database
# stores them with each score, round summaries average them over the selected structures).
ACQUISITION_COMPONENTS = ("bald_e", "bald_f", "energy_std", "max_force_std")


class LabelStatus(enum.StrEnum):
    """Outcome of one labeling calculation (the values the database stores)."""

    OK = "ok"
    SCF_FAILED = "scf_failed"
    TIMEOUT = "timeout"
    ERROR = "error"


class RoundMetric(enum.StrEnum):
    """Keys of a round's metrics (``rounds.metrics``) that more than one part reads.
    Per test set, test metrics are ``test_<set>_<quantity>`` (:func:`metric_on_test`)."""

    TEST_FORCE_MAE = "test_force_mae"  # eV/Å, all test sets
    TEST_ENERGY_MAE = "test_energy_mae"  # eV
    TEST_FORCE_NLL = "test_force_nll"  # nats
    TEST_FORCE_MISCAL = "test_force_miscal_area"
    TEST_FORCE_MISCAL_RECAL = "test_force_miscal_area_recal"
    VALID_FORCE_MAE = "valid_force_mae"  # eV/Å, the model's validation split
    VALID_ENERGY_MAE = "valid_energy_mae"
    N_TRAIN_LABELS = "n_train_labels"  # labelled structures the model was trained on
    WARM_START = "warm_start"  # 1.0: fine-tuned from the previous round's model
    N_EXPLORED = "n_explored"
    N_SCORED = "n_scored"
    N_SELECTED = "n_selected"
    POOL_SCORE_MAX = "pool_score_max"
    POOL_SCORE_MEAN = "pool_score_mean"
    SELECTED_SCORE_MAX = "selected_score_max"
    SELECTED_SCORE_MEAN = "selected_score_mean"
    THRESHOLD = "threshold"
    N_OK = "n_ok"  # labels of this round
    N_FAILED = "n_failed"
    N_LABELS_TOTAL = "n_labels_total"  # ok training labels of the campaign so far
    TRAIN_S = "train_s"  # wall seconds of each step and of the whole round
    EVALUATE_S = "evaluate_s"
    EXPLORE_S = "explore_s"
    SCORE_S = "score_s"
    LABEL_S = "label_s"
    ROUND_S = "round_s"
    OVERHEAD_S = "overhead_s"  # round time outside the steps above


STEP_SECONDS = (RoundMetric.TRAIN_S, RoundMetric.EVALUATE_S, RoundMetric.EXPLORE_S,
                RoundMetric.SCORE_S, RoundMetric.LABEL_S)


def metric_on_test(quantity: str, test_set: str | None = None) -> str:
    """Key of a test metric: ``test_<quantity>`` over all test sets, ``test_<set>_<quantity>``
    for one (``quantity`` e.g. ``force_mae``, ``energy_reliability_p10_recal``)."""
    return f"test_{quantity}" if test_set is None else f"test_{test_set}_{quantity}"


def split_metric_on_test(key: str, quantity: str) -> tuple[bool, str | None]:
    """(is ``key`` a test metric of ``quantity``, its test set or None for all):
    the inverse of :func:`metric_on_test`."""
    if not (key.startswith("test_") and key.endswith(quantity)):
        return False, None
    middle = key[len("test_"):len(key) - len(quantity)]
    if middle == "":
        return True, None
    return (True, middle[:-1]) if middle.endswith("_") and len(middle) > 1 else (False, None)


def settings_hash(settings: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``settings`` (sorted keys): the identity of a level of
    theory. Labels with equal hashes are comparable; labelers, imports and the store all
    use this one function."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def pbc_flags(pbc) -> tuple[bool, bool, bool]:
    """Three periodic flags from a bool, a sequence of three or an array."""
    if isinstance(pbc, np.ndarray) and pbc.shape == (3,):
        return tuple(bool(p) for p in pbc.tolist())
    if isinstance(pbc, bool | np.bool_):
        return (bool(pbc),) * 3
    a, b, c = pbc
    return bool(a), bool(b), bool(c)


def structure_hash(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray, pbc) -> str:
    """Canonical sha256 hex digest of a structure: atomic numbers, positions and cell
    rounded to ``ROUND_ANGSTROM`` (Å; cell as rows, zeros for none) and the periodic flags.
    The same structure imported twice (from any file, in any campaign) has the same hash."""
    h = hashlib.sha256(np.asarray(numbers).astype("<i8", copy=False).tobytes())
    h.update(np.rint(np.asarray(positions, dtype=float) / ROUND_ANGSTROM).astype("<i8").tobytes())
    h.update(np.rint(np.asarray(cell, dtype=float) / ROUND_ANGSTROM).astype("<i8").tobytes())
    h.update(bytes(pbc_flags(pbc)))
    return h.hexdigest()


def atoms_hash(atoms) -> str:
    """:func:`structure_hash` of an ASE ``Atoms``."""
    return structure_hash(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)


def closest_pair(atoms, cutoff: float = MIN_DISTANCE) -> tuple[int, int, float] | None:
    """The closest pair of atoms nearer than ``cutoff`` Å (minimum image), or ``None``.

    Molecules (no periodic direction) use all pairs (up to 64 atoms) or a k-d tree; periodic
    cells use ASE's cell-list neighbour search with bins of at least 1 Å (bins of
    ``cutoff`` = 0.1 Å would number millions in a large box).
    """
    if not atoms.pbc.any():
        n = len(atoms)
        if n < 2:
            return None
        if n <= 64:  # small molecules: all pairs in numpy beat building a tree
            pos = atoms.positions
            d2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
            d2[np.diag_indices(n)] = np.inf
            k = int(np.argmin(d2))
            d = float(np.sqrt(d2.flat[k]))
            return (k // n, k % n, d) if d < cutoff else None
        from scipy.spatial import cKDTree  # lazy: scipy costs half a second to import

        dist, idx = cKDTree(atoms.positions).query(atoms.positions, k=2)
        i = int(np.argmin(dist[:, 1]))
        d = float(dist[i, 1])
        return (i, int(idx[i, 1]), d) if d < cutoff else None
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijd", atoms, max(cutoff, 1.0))
    close = d < cutoff
    if not close.any():
        return None
    k = int(np.flatnonzero(close)[np.argmin(d[close])])
    return int(i[k]), int(j[k]), float(d[k])


def parent_death_hook(signum: int) -> Callable[[], None]:
    """A function that asks Linux to send ``signum`` to the calling process when the thread
    that started it ends (PR_SET_PDEATHSIG; kept across exec). libc is looked up here, so
    the hook is safe as a ``preexec_fn`` (between fork and exec: no imports, no dlopen).
    Elsewhere than Linux the hook does nothing."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    import ctypes

    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    return lambda: prctl(1, signum)  # PR_SET_PDEATHSIG


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphans). The request only
    covers a parent alive when it is made: a process whose parent (``parent_pid``) already
    died exits here instead of doing work nobody will read."""
    parent_death_hook(signal.SIGKILL)()
    if os.getppid() != parent_pid:
        os._exit(1)


_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def strip_control(text: str) -> str:
    """``text`` without control characters (terminal escape sequences, bells), keeping tabs
    and newlines: for text from data shown in a terminal or a web page."""
    return _CONTROL_CHARACTERS.sub("", text)
