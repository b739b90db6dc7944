"""Acquisition: Gaussian BALD over energies and forces, its baselines, and batch selection.

Moment-matched Gaussian BALD (mutual information between a label and the parameters):

* energy: BALD_E = ½ log(1 + v_epi / v_ale);
* forces, per atom: BALD_F,i = ½ log det(I + Σ_ale,i⁻¹ Σ_epi,i)
  = ½ [log det(Σ_ale,i + Σ_epi,i) − log det Σ_ale,i];
* joint (default): BALD_EF = BALD_E + reduce_i BALD_F,i (reduce: sum, mean or max).

Baselines: ``energy-std`` (epistemic energy std, eV), ``max-force-std`` (the committee rule of
DP-GEN / aims-PAX: max_i ‖std f_i‖ = max_i sqrt(tr Σ_epi,i), eV/Å, highest first),
``trust-window`` (DP-GEN's selection as it runs: candidates whose max-force-std lies in the
trust window [trust_lo, trust_hi) eV/Å, chosen at random among them; below the window the
model is trusted, above it the frame is taken as unphysical) and ``random``.

Batch selection: ``top-k`` or ``diverse``: greedy maximisation of the joint information
½ log det(I + K_B) of the batch, with K(s, t) = a_s a_t C(s, t), a_s² = exp(2 score_s) − 1 (so a
single structure's information equals its score) and C the correlation of last-layer
features (for Laplace: the posterior correlation of the linearised energies, i.e. BatchBALD of
the linearised Gaussian model). Greedy max-det by incremental (pivoted) Cholesky.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from bayesal.contracts import ACQUISITION_COMPONENTS

if TYPE_CHECKING:  # torch is imported only by what predicts
    from bayesal.bayes_model.predict import Prediction

__all__ = ["Acquisition", "AcquisitionConfig", "Reduction", "Scores", "Selection", "score",
           "select"]

COMPONENTS = ACQUISITION_COMPONENTS  # stored with every score (bayesal.contracts)


class Acquisition(enum.StrEnum):
    BALD_EF = "bald-ef"
    BALD_E = "bald-e"
    BALD_F = "bald-f"
    ENERGY_STD = "energy-std"
    MAX_FORCE_STD = "max-force-std"
    TRUST_WINDOW = "trust-window"
    RANDOM = "random"


class Reduction(enum.StrEnum):
    SUM = "sum"
    MEAN = "mean"
    MAX = "max"


class Selection(enum.StrEnum):
    TOP_K = "top-k"
    DIVERSE = "diverse"
    POWER = "power"


class AcquisitionConfig(BaseModel):
    """How candidates are scored and chosen: the campaign YAML's ``acquisition:`` section,
    what ``bayesal score`` builds from its options, what :func:`score_pool` takes.

    One name per meaning: ``n_select`` structures are chosen (``batch_size`` is accepted in
    YAML for configs written before the name changed); ``chunk_size`` candidates are read
    and scored at once (memory); ``predict_batch`` structures go through the model per
    forward pass (speed); ``shard_size`` candidates make one scoring task of a campaign
    (fan-out)."""

    model_config = ConfigDict(extra="forbid")

    function: Acquisition = Acquisition.BALD_EF
    n_select: int = Field(10, ge=1, validation_alias=AliasChoices("n_select", "batch_size"),
                          description="Structures selected (and labelled) per round.")
    selection: Selection = Selection.DIVERSE
    reduction: Reduction = Reduction.SUM
    threshold: float | None = Field(None, description="Only candidates scoring at least this "
                                    "are selected.")
    keep: int | None = Field(None, ge=1, description="Best candidates kept for the "
                             "selection (None: max(10 n_select, 100)).")
    chunk_size: int = Field(256, ge=1, description="Candidates read and scored at once.")
    predict_batch: int = Field(32, ge=1, description="Structures per forward pass.")
    shard_size: int = Field(20_000, ge=1, description="Campaigns: candidates per scoring "
                            "task; a larger pool is scored by several tasks on the "
                            "campaign's task runner (Dask workers on a cluster), with the "
                            "same scores and selection.")
    trust_lo: float = Field(0.05, ge=0, description="trust-window: lower bound of "
                            "max-force-std, eV/Å (DP-GEN's model_devi_f_trust_lo).")
    trust_hi: float = Field(0.15, gt=0, description="trust-window: upper bound of "
                            "max-force-std, eV/Å (DP-GEN's model_devi_f_trust_hi).")
    power_beta: float = Field(1.0, gt=0, description="selection power: candidates are drawn "
                              "with probability proportional to score^power_beta (higher: "
                              "closer to top-k; 0 would be uniform).")
    max_force_std_cap: float | None = Field(
        None, gt=0, description="Any function: candidates whose max-force-std is above this "
        "(eV/Å) are not selected: DP-GEN's upper trust level for every acquisition (frames "
        "so far from the training data that they are likely unphysical, such as the frame "
        "where an exploration stopped); lifted for a selection in which no candidate is "
        "within it. None: no cap.")

    @model_validator(mode="after")
    def _window(self) -> AcquisitionConfig:
        if self.trust_lo >= self.trust_hi:
            raise ValueError(f"trust_lo ({self.trust_lo}) must be below trust_hi "
                             f"({self.trust_hi})")
        return self

    @property
    def n_keep(self) -> int:
        return max(self.keep or max(10 * self.n_select, 100), self.n_select)


@dataclass
class Scores:
    """Per-structure acquisition score and all its components (arrays of shape (S,))."""

    score: np.ndarray
    bald_e: np.ndarray  # nats
    bald_f: np.ndarray  # nats (reduced over atoms)
    energy_std: np.ndarray  # epistemic, eV
    max_force_std: np.ndarray  # epistemic, eV/Å

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"score": self.score, **{k: getattr(self, k) for k in COMPONENTS}}


def _logdet_spd(m: np.ndarray) -> np.ndarray:
    sign, logdet = np.linalg.slogdet(m)
    if np.any(sign <= 0):
        raise ValueError("a covariance matrix is not positive definite")
    return logdet


def bald_energy(var_epi: np.ndarray, var_ale: np.ndarray) -> np.ndarray:
    """½ log(1 + v_epi / v_ale) per structure (nats)."""
    return 0.5 * np.log1p(np.clip(var_epi, 0, None) / var_ale)


def bald_forces_per_atom(cov_epi: np.ndarray, cov_ale: np.ndarray) -> np.ndarray:
    """½ log det(I + Σ_ale⁻¹ Σ_epi) per atom (nats); (N, 3, 3) inputs."""
    value = 0.5 * (_logdet_spd(cov_ale + cov_epi) - _logdet_spd(cov_ale))
    return np.clip(value, 0, None)  # rounding of an exactly zero Σ_epi


def _reduce(per_atom: np.ndarray, n_atoms: np.ndarray, how: Reduction) -> np.ndarray:
    idx = np.repeat(np.arange(len(n_atoms)), n_atoms)
    if how is Reduction.MAX:
        out = np.full(len(n_atoms), -np.inf)
        np.maximum.at(out, idx, per_atom)
        return out
    total = np.bincount(idx, weights=per_atom, minlength=len(n_atoms))
    return total / n_atoms if how is Reduction.MEAN else total


OUTSIDE_WINDOW = -1.0  # trust-window score of a candidate outside the window


def uniform_draws(seed: int, index: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) number per structure index, a hash (splitmix64) of (seed, index):
    the same for a structure whichever chunk, order or process scores it."""
    mask = (1 << 64) - 1
    with np.errstate(over="ignore"):
        z = (np.uint64((seed * 0x9E3779B97F4A7C15) & mask)
             + np.asarray(index, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
             + np.uint64(0x632BE59BD9B4E019))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def power_keys(scores: np.ndarray, seed: int, index: np.ndarray, beta: float = 1.0,
               ) -> np.ndarray:
    """Keys whose top k are k draws without replacement with probability proportional to
    ``scores ** beta`` (power acquisition, Kirsch et al., TMLR 2023): beta·log(score) plus a
    Gumbel variable from the structure's own :func:`uniform_draws` (a stream apart from
    ``random``'s), so the draw is the same however the pool is chunked or sharded.
    Scores at or below zero get a key of -inf: never drawn (probability zero)."""
    u = np.clip(uniform_draws(seed ^ 0x5F3759DF, index), 2.0**-53, None)
    with np.errstate(divide="ignore"):
        log_s = np.log(np.clip(np.asarray(scores, dtype=float), 0, None))
    return beta * log_s - np.log(-np.log(u))


def score(pred: Prediction, acquisition: Acquisition | str = Acquisition.BALD_EF, *,
          reduction: Reduction | str = Reduction.SUM, seed: int = 0, first_index: int = 0,
          trust: tuple[float, float] = (0.05, 0.15)) -> Scores:
    """Scores of every structure in ``pred`` (components are returned for all methods).

    ``random`` and ``trust-window`` give structure ``first_index + k`` of a pool the draw
    :func:`uniform_draws` (seed, that index): the same scores however the pool is chunked
    or spread over processes. ``trust-window`` scores a structure whose max-force-std lies
    in ``trust`` = [lo, hi) eV/Å with its draw and every other one :data:`OUTSIDE_WINDOW`
    (never selected).
    """
    acquisition, reduction = Acquisition(acquisition), Reduction(reduction)
    bald_e = bald_energy(pred.energy_var_epi, pred.energy_var_ale)
    bald_f_atom = bald_forces_per_atom(pred.forces_cov_epi, pred.forces_cov_ale)
    bald_f = _reduce(bald_f_atom, pred.n_atoms, reduction)
    energy_std = np.sqrt(np.clip(pred.energy_var_epi, 0, None))
    max_force_std = _reduce(pred.atom_force_deviation, pred.n_atoms, Reduction.MAX)
    if acquisition in (Acquisition.RANDOM, Acquisition.TRUST_WINDOW):
        value = uniform_draws(seed, first_index + np.arange(len(pred.n_atoms)))
        if acquisition is Acquisition.TRUST_WINDOW:
            inside = (max_force_std >= trust[0]) & (max_force_std < trust[1])
            value = np.where(inside, value, OUTSIDE_WINDOW)
    else:
        value = {Acquisition.BALD_EF: bald_e + bald_f, Acquisition.BALD_E: bald_e,
                 Acquisition.BALD_F: bald_f, Acquisition.ENERGY_STD: energy_std,
                 Acquisition.MAX_FORCE_STD: max_force_std}[acquisition]
    return Scores(score=value, bald_e=bald_e, bald_f=bald_f, energy_std=energy_std,
                  max_force_std=max_force_std)


def select(scores: np.ndarray, n_select: int, *, mode: Selection | str = Selection.TOP_K,
           features: np.ndarray | None = None, threshold: float | None = None,
           center_features: bool = True, information: np.ndarray | None = None) -> list[int]:
    """Indices of the ``n_select`` structures to label, best first.

    ``threshold``: only structures with score >= threshold are eligible (fewer may
    come back). ``diverse`` needs ``features`` (S, D): last-layer features; with
    ``center_features`` they are centred and scaled over the candidates before the cosine
    correlation (use False for features that already carry a posterior metric, e.g. Laplace's
    J_E L). ``information`` (nats, default: ``scores``) sets the diagonal of the kernel; pass
    BALD values when ``scores`` are not in nats (e.g. std baselines).
    """
    mode = Selection(mode)
    scores = np.asarray(scores, dtype=float)
    if n_select < 0:
        raise ValueError(f"n_select must be >= 0, got {n_select}")
    eligible = np.flatnonzero(np.isfinite(scores) if threshold is None
                              else np.isfinite(scores) & (scores >= threshold))
    if n_select == 0 or len(eligible) == 0:
        return []
    order = eligible[np.argsort(-scores[eligible], kind="stable")]
    if mode in (Selection.TOP_K, Selection.POWER) or len(order) <= 1:
        return order[:n_select].tolist()
    if features is None:
        raise ValueError("diverse selection needs last-layer features of the candidates")
    info = scores if information is None else np.asarray(information, dtype=float)
    return [int(order[i]) for i in greedy_max_det(info[order], features[order], n_select,
                                                  center=center_features)]


def greedy_max_det(information: np.ndarray, features: np.ndarray, k: int, *,
                   center: bool = True, jitter: float = 1e-9) -> list[int]:
    """Greedy maximisation of log det(I + K_B), K = diag(a) C diag(a), a² = e^{2·info} − 1.

    Incremental Cholesky of I + K: the gain of adding s is ½ log d_s, with d_s the conditional
    variance of s given the batch; after choosing j every d_s drops by c_s², c_s the new
    Cholesky entry. O(S·k·D) time, O(S·k) memory. Ties go to the earlier index.
    """
    x = np.asarray(features, dtype=float)
    if center:
        x = x - x.mean(0)
        x = x / (x.std(0) + 1e-12)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    u = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    a = np.sqrt(np.expm1(2 * np.clip(np.asarray(information, float), 0, 50)))
    n = len(a)
    d = 1.0 + a**2  # diagonal of I + K
    chol = np.zeros((n, min(k, n)))
    chosen: list[int] = []
    available = np.ones(n, dtype=bool)
    for m in range(min(k, n)):
        gain = np.where(available, d, -np.inf)
        j = int(np.argmax(gain))
        if not np.isfinite(gain[j]):
            break
        chosen.append(j)
        available[j] = False
        pivot = np.sqrt(max(d[j], jitter))
        k_col = a * a[j] * (u @ u[j])  # K(:, j); I adds nothing off the diagonal
        c = (k_col - chol[:, :m] @ chol[j, :m]) / pivot
        c[j] = pivot
        chol[:, m] = c
        d = d - c**2
        d[j] = 0.0
    return chosen

