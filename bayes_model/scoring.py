"""Streaming scoring of candidate pools far larger than memory.

Structures are read in chunks, predicted, scored and forgotten; only the best ``keep``
candidates (by score, with their features and structures) are held for the final batch
selection, so memory is flat in the pool size. Every structure's scores go to ``on_scores``
(e.g. a CSV writer) as soon as its chunk is done.
"""

from __future__ import annotations

import heapq
import logging
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
    power_keys,
    score,
    select,
)
from bayesal.bayes_model.predict import Prediction, predict_calibrated

__all__ = ["Candidate", "PoolSelection", "iter_scores", "score_pool", "stream_best"]

log = logging.getLogger(__name__)

BALD_FAMILY = (Acquisition.BALD_EF, Acquisition.BALD_E, Acquisition.BALD_F)


@dataclass(order=True)
class Candidate:
    # at most the max-force-std cap (or no cap): such candidates rank above all others, so
    # the others are kept only while too few are within it (see merge_selection)
    within_cap: bool
    key: float  # what the selection ranks by: the score, or power's perturbed log score
    index: int
    score: float = field(compare=False)
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
                seed: int = 0, recalibrated: bool = True, first_index: int = 0,
                ) -> Iterator[tuple[list[Atoms], Prediction, Scores]]:
    """Chunks of (structures, prediction, scores); ``random`` draws are per structure index
    (:func:`bayes_model.acquisition.uniform_draws`; ``frames`` start at pool index
    ``first_index``), so any chunking or sharding gives the same scores as scoring
    everything at once with the same seed."""
    first = first_index
    for chunk in _chunks(frames, config.chunk_size):
        pred = predict_calibrated(posterior, chunk, batch_size=config.predict_batch,
                                  recalibrated=recalibrated, mean_forces=False)
        yield chunk, pred, score(pred, config.function, reduction=config.reduction,
                                 seed=seed, first_index=first,
                                 trust=(config.trust_lo, config.trust_hi))
        first += len(chunk)


def best_candidates(chunk: list[Atoms], pred: Prediction, scores: Scores, first_index: int,
                    config: AcquisitionConfig, *, seed: int = 0) -> list[Candidate]:
    """The chunk's candidates that can be selected (above the threshold), best ``keep``
    first, those within the max-force-std cap before all others; each carries what the
    selection needs (components, information, features). ``power`` ranks them by their
    perturbed log score (:func:`bayes_model.acquisition.power_keys`, per pool index: the
    same in any chunk)."""
    acquisition, threshold = config.function, _threshold(config)
    info = scores.score if acquisition in BALD_FAMILY else scores.bald_e + scores.bald_f
    comps = scores.as_dict()
    cap = config.max_force_std_cap
    keys = (power_keys(scores.score, seed, first_index + np.arange(len(chunk)),
                       config.power_beta)
            if _mode(config) is Selection.POWER else scores.score)
    out = [Candidate(bool(cap is None or scores.max_force_std[j] <= cap), float(keys[j]),
                     -(first_index + j), float(scores.score[j]), atoms,
                     {c: float(v[j]) for c, v in comps.items()}, float(info[j]),
                     None if pred.features is None else pred.features[j].copy())
           for j, atoms in enumerate(chunk)
           if threshold is None or scores.score[j] >= threshold]
    return heapq.nlargest(config.n_keep, out)


def _mode(config: AcquisitionConfig) -> Selection:
    if config.function is Acquisition.TRUST_WINDOW:  # DP-GEN: at random within the window
        return Selection.TOP_K
    return Selection(config.selection)  # a str after an unvalidated model_copy


def _threshold(config: AcquisitionConfig) -> float | None:
    if config.function is Acquisition.TRUST_WINDOW:  # DP-GEN: inside the window only
        return max(config.threshold or 0.0, 0.0)
    return config.threshold


def merge_selection(parts: Iterable[list[Candidate]], n_scored: int, features_metric: bool,
                    config: AcquisitionConfig) -> PoolSelection:
    """The selection from every chunk's :func:`best_candidates`, wherever they were
    computed (this process or a worker each): the same as scoring the pool in one go.

    Only candidates within ``config.max_force_std_cap`` are selected (fewer than
    ``n_select`` when fewer are within it). When none is, the cap is lifted for this
    selection, as DP-GEN would otherwise label nothing: a model uncertain about every
    candidate (an early round) still gets its batch, and a campaign does not stop on it."""
    heap: list[Candidate] = []  # min-heap of the best ``keep``
    for part in parts:
        for cand in part:
            if len(heap) < config.n_keep:
                heapq.heappush(heap, cand)
            elif cand > heap[0]:
                heapq.heapreplace(heap, cand)
    # earlier structures win ties: the index is stored negated for the min-heap
    pool = sorted(heap, key=lambda c: (-c.key, -c.index))
    for c in pool:
        c.index = -c.index
    if any(c.within_cap for c in pool):
        pool = [c for c in pool if c.within_cap]
    elif pool and config.max_force_std_cap is not None:
        log.warning("no candidate's max-force-std is within max_force_std_cap %g eV/Å "
                    "(lowest of the %d best scored: %.3g eV/Å): the cap is lifted for this "
                    "selection", config.max_force_std_cap, len(pool),
                    min(c.components["max_force_std"] for c in pool))
    if not pool:
        return PoolSelection([], n_scored, features_metric)
    features = (np.stack([c.features for c in pool]) if all(c.features is not None
                                                            for c in pool) else None)
    chosen = select(np.array([c.key for c in pool]), config.n_select, mode=_mode(config),
                    features=features,
                    center_features=not features_metric,
                    information=np.array([c.information for c in pool]))
    return PoolSelection([pool[i] for i in chosen], n_scored, features_metric)


def stream_best(posterior, frames: Iterable[Atoms], config: AcquisitionConfig, *,
                seed: int = 0, first_index: int = 0,
                on_scores: Callable[[int, list[Atoms], Scores], None] | None = None,
                ) -> tuple[list[Candidate], int, bool]:
    """Score ``frames`` (pool indices from ``first_index``) chunk by chunk, keeping only the
    best ``config.n_keep`` candidates (memory flat in the pool size): (those candidates,
    how many were scored, whether the features are a metric). ``on_scores(first_index,
    chunk, scores)`` is called per chunk. A whole pool, or one worker's shard of it."""
    n, metric = 0, False
    best: list[Candidate] = []
    for chunk, pred, scores in iter_scores(posterior, frames, config, seed=seed,
                                           first_index=first_index):
        if on_scores is not None:
            on_scores(first_index + n, chunk, scores)
        metric = pred.features_metric
        best = heapq.nlargest(config.n_keep, best + best_candidates(
            chunk, pred, scores, first_index + n, config, seed=seed))
        n += len(chunk)
    return best, n, metric


def score_pool(posterior, frames: Iterable[Atoms], config: AcquisitionConfig, *,
               seed: int = 0,
               on_scores: Callable[[int, list[Atoms], Scores], None] | None = None,
               ) -> PoolSelection:
    """Score every structure of ``frames`` and select ``config.n_select``.

    The ``config.n_keep`` candidates with the best scores are retained for the selection
    (``diverse`` chooses among them). ``on_scores(first_index, chunk, scores)`` is called
    per chunk. Chunks scored elsewhere (workers) merge the same way: each gives
    :func:`stream_best` (or :func:`best_candidates`), :func:`merge_selection` chooses.
    """
    best, n, metric = stream_best(posterior, frames, config, seed=seed, on_scores=on_scores)
    return merge_selection([best], n, metric, config)
