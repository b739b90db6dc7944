"""Calibration, recalibration and out-of-distribution metrics of uncertainties.

All calibration metrics start from probability integral transform (PIT) values
u = Φ((y − μ)/σ) of each energy and each force component (marginal Gaussian with the total
predictive variance). For a calibrated model u is uniform:

* miscalibration area: ∫₀¹ |P̂(u ≤ p) − p| dp (0 = calibrated, 0.5 = worst); the
  reliability curve is P̂(u ≤ p) at p = 0.1, 0.2, ..., 0.9 (keys ``*_reliability_pNN``);
* coverage of the central 68 / 95 % intervals: P̂((1−α)/2 ≤ u ≤ (1+α)/2);
* ENCE (Levi et al. 2022): structures/components sorted by σ into equal-count bins,
  mean_b |RMV_b − RMSE_b| / RMV_b;
* Spearman ρ between |error| and σ, Gaussian NLL (in metrics.accuracy_metrics);
* OOD AUROC: probability that an out-of-distribution structure gets a larger epistemic
  uncertainty than an in-distribution one (Mann-Whitney U / (n₁n₂)).

Recalibration (fitted on validation data, stored with the model as ``calibration.json``): one
variance scale for energies and one for forces, the posterior scale of a scaled-inverse-χ²
prior with ν₀ pseudo-structures at the uncorrected scale 1,

    s² = (ν₀ m + Σ z²) / (ν₀ m + n),

where z = (y − μ)/σ over the n validation energies (m = 1) or force components (m = mean
3N per structure). ν₀ = 0 is the maximum-likelihood s² = mean(z²). The prior matters when
validation is small, as early in an active-learning campaign: a maximum-likelihood fit on one
or two structures can shrink σ a hundredfold (benchmarks/recalibration_prior.py measures
this on the active-learning benchmark's rounds). Optionally isotonic recalibration of the PIT
values (Kuleshov et al. 2018: the empirical CDF of validation PIT values, a monotone map
applied to new PIT values).

Optionally (``aleatoric_on``) the aleatoric variances are first scaled alone, by
a² = mean(r²/σ²_ale) over the training residuals (energies; force components) of the model as
it predicts. The variance heads learn the residuals of the weights being trained, while
predictions use their moving average, which is far more accurate at a high learning rate
(ethanol, 47 structures: 100-270 meV batch energy errors against 26 meV for the average, and
σ_E,ale 123 meV after 150 epochs; docs/posteriors.md). That drowns BALD's energy term,
½ log(1 + σ²_epi/σ²_ale), and no common scale of both parts can change the ratio. The scales
above are then fitted with the rescaled aleatoric part.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from ase import Atoms
from scipy.special import ndtr
from scipy.stats import rankdata

from bayesal.bayes_model.metrics import (
    accuracy_metrics,
    profile_metrics,
    reference_energies,
    reference_labels,
    with_forces,
)
from bayesal.bayes_model.predict import Prediction

__all__ = ["RELIABILITY_LEVELS", "Recalibration", "aleatoric_scales", "auroc",
           "calibration_metrics", "coverage", "ence", "fit_recalibration",
           "miscalibration_area", "ood_auroc", "plot_calibration", "reliability_curve"]

CALIBRATION_FILE = "calibration.json"
PRIOR_WEIGHT = 0.25  # ν₀: best mean test energy NLL on the active-learning benchmark's rounds
_GRID = np.linspace(0.0, 1.0, 101)
RELIABILITY_LEVELS = tuple(range(10, 100, 10))  # percent


def miscalibration_area(pit: np.ndarray) -> float:
    """∫ |P̂(u ≤ p) − p| dp over p in [0, 1] (trapezoid on 101 points)."""
    u = np.sort(np.asarray(pit, dtype=float).ravel())
    observed = np.searchsorted(u, _GRID, side="right") / len(u)
    return float(np.trapezoid(np.abs(observed - _GRID), _GRID))


def reliability_curve(pit: np.ndarray, levels=RELIABILITY_LEVELS) -> dict[int, float]:
    """Observed P̂(u ≤ p) at expected p = level / 100 (the diagonal when calibrated)."""
    u = np.sort(np.asarray(pit, dtype=float).ravel())
    return {q: float(np.searchsorted(u, q / 100, side="right") / len(u)) for q in levels}


def coverage(pit: np.ndarray, level: float) -> float:
    """Fraction of PIT values inside the central ``level`` interval."""
    u = np.asarray(pit, dtype=float).ravel()
    lo, hi = (1 - level) / 2, (1 + level) / 2
    return float(np.mean((u >= lo) & (u <= hi)))


def ence(errors: np.ndarray, std: np.ndarray, bins: int = 10) -> float:
    """Expected normalised calibration error over equal-count bins of σ."""
    err, sd = np.asarray(errors, float).ravel(), np.asarray(std, float).ravel()
    order = np.argsort(sd, kind="stable")
    values = []
    for part in np.array_split(order, min(bins, len(order))):
        rmv = math.sqrt(np.mean(sd[part] ** 2))
        rmse = math.sqrt(np.mean(err[part] ** 2))
        values.append(abs(rmv - rmse) / rmv)
    return float(np.mean(values))


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve for separating ``positives`` (higher scores) from
    ``negatives``; ties count one half."""
    neg, pos = np.asarray(negatives, float).ravel(), np.asarray(positives, float).ravel()
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("AUROC needs at least one in-distribution and one OOD structure")
    ranks = rankdata(np.concatenate([neg, pos]))
    u = ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(neg) * len(pos)))


@dataclass
class Recalibration:
    """Variance scales (multiply both epistemic and aleatoric variances) and optional
    isotonic maps of PIT values (knots x -> y, monotone)."""

    energy_scale: float = 1.0
    force_scale: float = 1.0
    energy_aleatoric_scale: float = 1.0  # the aleatoric variance only, applied first
    force_aleatoric_scale: float = 1.0
    energy_isotonic: list[list[float]] | None = None  # [x knots, y knots]
    force_isotonic: list[list[float]] | None = None
    fitted_on: dict = field(default_factory=dict)

    def apply(self, pred: Prediction) -> Prediction:
        """The prediction with scaled variances (means unchanged)."""
        return replace(pred, energy_var_epi=pred.energy_var_epi * self.energy_scale,
                       energy_var_ale=pred.energy_var_ale * (self.energy_scale
                                                             * self.energy_aleatoric_scale),
                       forces_cov_epi=pred.forces_cov_epi * self.force_scale,
                       forces_cov_ale=pred.forces_cov_ale * (self.force_scale
                                                             * self.force_aleatoric_scale))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CALIBRATION_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Recalibration | None:
        path = Path(directory) / CALIBRATION_FILE
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{path} is corrupted ({exc}); delete it or refit with "
                             "`bayesal evaluate --recalibrate-on FILE`") from None


def _pit(pred: Prediction, images: Sequence[Atoms]):
    """Errors, σ and PIT values of energies (S,) and force components (3N,) of the images
    that carry forces (empty force arrays when none does)."""
    e_err, f_err, sub = _residuals(pred, images)
    e_std = np.sqrt(pred.energy_var_epi + pred.energy_var_ale)
    f_std = (np.zeros(0) if sub is None else np.sqrt(np.diagonal(
        sub.forces_cov_epi + sub.forces_cov_ale, axis1=1, axis2=2)).ravel())
    return e_err, e_std, ndtr(e_err / e_std), f_err, f_std, ndtr(f_err / f_std)


def _residuals(pred: Prediction, images: Sequence[Atoms]):
    """Energy errors (S,), force-component errors (3N,) of the structures that carry forces,
    and the prediction of those structures (None when none does)."""
    e_err = reference_energies(images) - pred.energy
    forced = with_forces(images)
    if not forced:
        return e_err, np.zeros(0), None
    sub = pred if len(forced) == len(images) else pred.subset(forced)
    _, f_ref = reference_labels([images[k] for k in forced])
    return e_err, (f_ref - sub.forces).ravel(), sub


def _isotonic_map(pit: np.ndarray, knots: int = 200) -> list[list[float]]:
    """Empirical CDF of PIT values as monotone knots (x, y), anchored at (0,0) and (1,1)."""
    u = np.sort(np.asarray(pit, float).ravel())
    q = np.linspace(0, 1, min(knots, len(u)) + 2)[1:-1]
    x = np.quantile(u, q)
    x, idx = np.unique(x, return_index=True)
    y = q[idx]
    return [[0.0, *x.tolist(), 1.0], [0.0, *y.tolist(), 1.0]]


def _apply_isotonic(pit: np.ndarray, mapping: list[list[float]] | None) -> np.ndarray:
    return pit if mapping is None else np.interp(pit, mapping[0], mapping[1])


def aleatoric_scales(pred: Prediction, images: Sequence[Atoms]) -> tuple[float, float]:
    """(energy, force) factors a² = mean(r²/σ²_ale) of the aleatoric variances, from
    labelled (training) structures; (1, 1) for a part without residuals."""
    e_err, f_err, sub = _residuals(pred, images)
    energy = float(np.mean(e_err**2 / pred.energy_var_ale)) if len(e_err) else 1.0
    force = 1.0 if sub is None else float(np.mean(
        f_err**2 / np.diagonal(sub.forces_cov_ale, axis1=1, axis2=2).ravel()))
    return energy, force


def fit_recalibration(pred: Prediction, images: Sequence[Atoms], *,
                      isotonic: bool = False,
                      prior_weight: float = PRIOR_WEIGHT,
                      aleatoric_on: tuple[Prediction, Sequence[Atoms]] | None = None,
                      aleatoric: tuple[float, float] = (1.0, 1.0)) -> Recalibration:
    """Variance scales for energies and force components (and isotonic maps of the rescaled
    PIT values if asked) from labelled validation structures; ``prior_weight`` is ν₀, the
    number of pseudo-structures at scale 1 (0: maximum likelihood, mean(z²)).

    ``aleatoric_on`` = (prediction, structures) of the training set: the aleatoric
    variances are scaled by :func:`aleatoric_scales` on them first (``aleatoric``: those
    factors given, e.g. kept from an earlier fit)."""
    if prior_weight < 0:
        raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
    if aleatoric_on is not None:
        aleatoric = aleatoric_scales(*aleatoric_on)
    first = Recalibration(energy_aleatoric_scale=aleatoric[0],
                          force_aleatoric_scale=aleatoric[1])
    e_err, e_std, _, f_err, f_std, _ = _pit(first.apply(pred), images)
    if len(e_err) == 0:
        raise ValueError("recalibration needs at least one labelled validation structure")
    if len(f_err) == 0:
        raise ValueError("recalibration needs structures with forces (energy and force "
                         "variances are scaled together); these carry energies only")

    def scale(z2: np.ndarray, pseudo: float) -> float:
        return float((pseudo + z2.sum()) / (pseudo + len(z2)))

    e_scale = scale((e_err / e_std) ** 2, prior_weight)
    f_scale = scale((f_err / f_std) ** 2, prior_weight * len(f_err) / len(e_err))
    fitted_on = {"structures": len(e_err), "force_components": len(f_err),
                 "prior_weight": prior_weight}
    if aleatoric_on is not None:
        fitted_on["aleatoric_structures"] = len(aleatoric_on[1])
    recal = Recalibration(energy_scale=e_scale, force_scale=f_scale,
                          energy_aleatoric_scale=aleatoric[0],
                          force_aleatoric_scale=aleatoric[1], fitted_on=fitted_on)
    if isotonic:
        _, _, e_pit, _, _, f_pit = _pit(recal.apply(pred), images)
        recal.energy_isotonic = _isotonic_map(e_pit)
        recal.force_isotonic = _isotonic_map(f_pit)
    return recal


def calibration_metrics(pred: Prediction, images: Sequence[Atoms], *,
                        recalibration: Recalibration | None = None,
                        reliability: bool = False) -> dict[str, float]:
    """Miscalibration area, ENCE and 68/95 % coverage of energies and forces; with
    ``recalibration`` the same after it (keys suffixed ``_recal``); with ``reliability`` the
    reliability curves too (``energy_reliability_p10``, ... = P̂(u ≤ 0.10), ...)."""
    out: dict[str, float] = {}
    variants = [("", pred, None, None)]
    if recalibration is not None:
        variants.append(("_recal", recalibration.apply(pred), recalibration.energy_isotonic,
                         recalibration.force_isotonic))
    for suffix, p, e_map, f_map in variants:
        e_err, e_std, e_pit, f_err, f_std, f_pit = _pit(p, images)
        for name, err, std, pit, mapping in (("energy", e_err, e_std, e_pit, e_map),
                                             ("force", f_err, f_std, f_pit, f_map)):
            if not len(err):  # no forces in these images: no force calibration
                continue
            pit = _apply_isotonic(pit, mapping)
            out[f"{name}_miscal_area{suffix}"] = miscalibration_area(pit)
            out[f"{name}_ence{suffix}"] = ence(err, std)
            out[f"{name}_coverage68{suffix}"] = coverage(pit, 0.6827)
            out[f"{name}_coverage95{suffix}"] = coverage(pit, 0.9545)
            if reliability:
                for q, observed in reliability_curve(pit).items():
                    out[f"{name}_reliability_p{q:02d}{suffix}"] = observed
    return out


def evaluate_prediction(pred: Prediction, images: Sequence[Atoms], *,
                        recalibration: Recalibration | None = None,
                        reliability: bool = False, profile: bool = False) -> dict[str, float]:
    """Accuracy, NLL and calibration of a prediction on labelled structures: the
    :func:`bayesal.bayes_model.metrics.accuracy_metrics`, the :func:`calibration_metrics`
    (after ``recalibration`` too) and the NLLs after it (``*_nll_recal``); with
    ``profile`` the :func:`bayesal.bayes_model.metrics.profile_metrics` of the structures
    in their order. Force metrics only where the structures carry forces. One
    implementation for ``bayesal evaluate`` and a campaign round's evaluation."""
    out = accuracy_metrics(pred, images)
    if profile:
        out.update(profile_metrics(pred, images))
    out.update(calibration_metrics(pred, images, recalibration=recalibration,
                                   reliability=reliability))
    if recalibration is not None:
        out.update({f"{k}_recal": v for k, v in
                    accuracy_metrics(recalibration.apply(pred), images).items() if "nll" in k})
    return out


def epistemic_per_structure(pred: Prediction) -> tuple[np.ndarray, np.ndarray]:
    """Per structure: epistemic energy std per atom (eV) and mean per-atom epistemic force
    std sqrt(tr Σ_epi,i) (eV/Å): the uncertainty scores used for OOD detection."""
    e = np.sqrt(np.clip(pred.energy_var_epi, 0, None)) / pred.n_atoms
    f_atom = np.sqrt(np.clip(np.trace(pred.forces_cov_epi, axis1=1, axis2=2), 0, None))
    idx = np.repeat(np.arange(len(pred.n_atoms)), pred.n_atoms)
    f = np.bincount(idx, weights=f_atom, minlength=len(pred.n_atoms)) / pred.n_atoms
    return e, f


def ood_auroc(pred_in: Prediction, pred_ood: Prediction) -> dict[str, float]:
    """AUROC of separating in-distribution from OOD structures by epistemic uncertainty."""
    e_in, f_in = epistemic_per_structure(pred_in)
    e_ood, f_ood = epistemic_per_structure(pred_ood)
    return {"ood_auroc_energy": auroc(e_in, e_ood), "ood_auroc_force": auroc(f_in, f_ood)}


def plot_calibration(pred: Prediction, images: Sequence[Atoms], out_dir: str | Path, name: str,
                     *, recalibration: Recalibration | None = None) -> list[Path]:
    """Reliability diagram and binned error-vs-σ plot (PNG) for energies and forces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = _pit(pred, images)
    cal = _pit(recalibration.apply(pred), images) if recalibration is not None else None
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, (label, i_pit, mapping_key) in zip(
            axes, (("energy", 2, "energy_isotonic"), ("force", 5, "force_isotonic")),
            strict=True):
        for tag, data, mapping in (("raw", raw, None), ("recalibrated", cal, None if cal is None
                                   else getattr(recalibration, mapping_key))):
            if data is None:
                continue
            pit = np.sort(_apply_isotonic(data[i_pit], mapping))
            observed = np.searchsorted(pit, _GRID, side="right") / len(pit)
            ax.plot(_GRID, observed, label=f"{tag} (area {miscalibration_area(pit):.3f})")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="calibrated")
        ax.set(xlabel="expected quantile", ylabel="observed fraction", title=label)
        ax.legend(fontsize=8)
    paths.append(_save(fig, f"reliability: {name}", out / f"{name}_reliability.png"))

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, (label, unit, i_err, i_std) in zip(
            axes, (("energy", "eV", 0, 1), ("force component", "eV/Å", 3, 4)), strict=True):
        err, std = np.abs(raw[i_err]), raw[i_std]
        order = np.argsort(std)
        bins = np.array_split(order, min(15, len(order)))
        rmv = [math.sqrt(np.mean(std[b] ** 2)) for b in bins]
        rmse = [math.sqrt(np.mean(err[b] ** 2)) for b in bins]
        ax.scatter(std[:: max(1, len(std) // 3000)], err[:: max(1, len(std) // 3000)], s=2,
                   alpha=0.3, color="grey", label="samples")
        ax.plot(rmv, rmse, "o-", label="binned RMSE vs RMV")
        lim = max(max(rmv), max(rmse))
        ax.plot([0, lim], [0, lim], "k--", lw=0.8)
        ax.set(xlabel=f"predicted σ ({unit})", ylabel=f"|error| ({unit})", title=label,
               xscale="log", yscale="log")
        ax.legend(fontsize=8)
    paths.append(_save(fig, f"error vs σ: {name}", out / f"{name}_error_vs_sigma.png"))
    return paths


def _save(fig, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
