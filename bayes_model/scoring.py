"""Streaming scoring of candidate pools far larger than memory.

Structures are read in chunks, predicted, scored and forgotten; only the best ``keep``
candidates (by score, with their features and structures) are held for the final batch
selection, so memory is flat in the pool size. Every structure's scores go to ``on_scores``
(e.g. a CSV writer) as soon as its chunk is done.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
from ase import Atoms

from bayesal.bayes_model.acquisition import (
    Acquisition,
    AcquisitionConfig,
    Scores,
    Selection,
    score,
    select,
)
from bayesal.bayes_model.predict import Prediction, predict_calibrated

__all__ = ["Candidate", "PoolSelection", "iter_scores", "score_pool"]

BALD_FAMILY = (Acquisition.BALD_EF, Acquisition.BALD_E, Acquisition.BALD_F)


@dataclass(order=True)
class Candidate:
    score: float
    index: int
    atoms: Atoms = field(compare=False)
    components: dict[str, float] = field(compare=False)
    information: float = field(compare=False)
    features: np.ndarray | None = field(compare=False)


@dataclass
class PoolSelection:
    selected: list[Candidate]  # best first (selection order)
    n_scored: int
    features_metric: bool


def _chunks(frames: Iterable[Atoms], size: int) -> Iterator[list[Atoms]]:
    it = iter(frames)
    while chunk := list(islice(it, size)):
        yield chunk


def iter_scores(posterior, frames: Iterable[Atoms], config: AcquisitionConfig, *,
                seed: int = 0, recalibrated: bool = True,
                ) -> Iterator[tuple[list[Atoms], Prediction, Scores]]:
    """Chunks of (structures, prediction, scores); one random generator across chunks, so
    ``random`` gives the same scores as scoring everything at once with the same seed."""
    rng = np.random.default_rng(seed)
    for chunk in _chunks(frames, config.chunk_size):
        pred = predict_calibrated(posterior, chunk, batch_size=config.predict_batch,
                                  recalibrated=recalibrated)
        yield chunk, pred, score(pred, config.function, reduction=config.reduction, rng=rng,
                                 trust=(config.trust_lo, config.trust_hi))


def score_pool(posterior, frames: Iterable[Atoms], config: AcquisitionConfig, *,
               seed: int = 0,
               on_scores: Callable[[int, list[Atoms], Scores], None] | None = None,
               ) -> PoolSelection:
    """Score every structure of ``frames`` and select ``config.n_select``.

    The ``config.n_keep`` candidates with the best scores are retained for the selection
    (``diverse`` chooses among them). ``on_scores(first_index, chunk, scores)`` is called
    per chunk.
    """
    acquisition, threshold, mode = config.function, config.threshold, config.selection
    if acquisition is Acquisition.TRUST_WINDOW:  # DP-GEN: at random inside the window only
        threshold, mode = max(threshold or 0.0, 0.0), Selection.TOP_K
    keep = config.n_keep
    heap: list[Candidate] = []  # min-heap of the best ``keep``
    n = 0
    metric = False
    for chunk, pred, scores in iter_scores(posterior, frames, config, seed=seed):
        if on_scores is not None:
            on_scores(n, chunk, scores)
        metric = pred.features_metric
        info = scores.score if acquisition in BALD_FAMILY else scores.bald_e + scores.bald_f
        comps = scores.as_dict()
        for j, atoms in enumerate(chunk):
            s = float(scores.score[j])
            if threshold is not None and s < threshold:
                continue
            cand = Candidate(s, -(n + j), atoms, {c: float(v[j]) for c, v in comps.items()},
                             float(info[j]), None if pred.features is None
                             else pred.features[j].copy())
            if len(heap) < keep:
                heapq.heappush(heap, cand)
            elif cand > heap[0]:
                heapq.heapreplace(heap, cand)
        n += len(chunk)
    # earlier structures win ties: the index is stored negated for the min-heap
    pool = sorted(heap, key=lambda c: (-c.score, -c.index))
    for c in pool:
        c.index = -c.index
    if not pool:
        return PoolSelection([], n, metric)
    features = (np.stack([c.features for c in pool]) if all(c.features is not None
                                                            for c in pool) else None)
    chosen = select(np.array([c.score for c in pool]), config.n_select,
                    mode=mode, features=features,
                    center_features=not metric,
                    information=np.array([c.information for c in pool]))
    return PoolSelection([pool[i] for i in chosen], n, metric)
