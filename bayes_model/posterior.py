"""One factory for Bayesian posteriors; each delivers the prediction contract.

Methods: ``ensemble`` (deep ensemble, DE-MVE), ``laplace`` (last-layer Laplace), ``swag`` and
``ivon`` (sampled weights). The last three start from one trained mean-variance model. A
model directory's manifest names its method and the posterior state file (sha256-checked);
``calibration.json`` holds the variance scales fitted on validation data.
"""

from __future__ import annotations

import enum
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ase import Atoms

from bayesal.bayes_model.calibration import Recalibration, fit_recalibration
from bayesal.bayes_model.checkpoint import (
    CheckpointError,
    Manifest,
    load_members,
    load_state_file,
    read_manifest,
    save_members,
    save_state_file,
)
from bayesal.bayes_model.config import TrainingFile
from bayesal.bayes_model.data import atoms_to_graph
from bayesal.bayes_model.device import check_device, resolve_device
from bayesal.bayes_model.ensemble import train_ensemble
from bayesal.bayes_model.kernels import check_kernels
from bayesal.bayes_model.laplace import LastLayerLaplace
from bayesal.bayes_model.model import MVEPotential
from bayesal.bayes_model.predict import Prediction, predict_members
from bayesal.bayes_model.quality import assess
from bayesal.bayes_model.resources import Deadline, plan_processes
from bayesal.bayes_model.sampling import SampledPosterior, collect_swag, load_flat, train_ivon

__all__ = ["EnsemblePosterior", "Method", "Posterior", "TrainingPlan", "fit_posterior",
           "load_posterior", "plan_training", "train_posterior"]


class Method(enum.StrEnum):
    ENSEMBLE = "ensemble"
    LAPLACE = "laplace"
    SWAG = "swag"
    IVON = "ivon"


class EnsemblePosterior:
    """Deep ensemble: members as posterior samples (DE-MVE)."""

    method = Method.ENSEMBLE

    def __init__(self, models: Sequence[MVEPotential], manifest: Manifest | None = None) -> None:
        self.models = list(models)
        self.manifest = manifest

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu",
             kernels: str = "e3nn") -> EnsemblePosterior:
        models, manifest = load_members(directory, device, kernels)
        return cls(models, manifest)

    @property
    def species(self) -> list[int]:
        return self.models[0].species

    @property
    def cutoff(self) -> float:
        return self.models[0].config.cutoff

    def predict(self, images: Sequence[Atoms], *, batch_size: int = 32,
                max_atoms: int = 4096) -> Prediction:
        return predict_members(self.models, images, batch_size=batch_size, max_atoms=max_atoms)


Posterior = EnsemblePosterior | LastLayerLaplace | SampledPosterior


@dataclass(frozen=True)
class TrainingPlan:
    """What a training run will do: ``members`` models (1 unless an ensemble), ``processes``
    at a time with ``threads`` each, under ``settings`` (seed included)."""

    method: Method
    members: int
    processes: int
    threads: int
    settings: TrainingFile

    def run(self, train: Sequence[Atoms], valid: Sequence[Atoms], out_dir: str | Path,
            **kwargs: Any) -> Path:
        """:func:`train_posterior` with this plan (``kwargs``: its other arguments)."""
        return train_posterior(self.method, train, valid, out_dir, settings=self.settings,
                               members=self.members, processes=self.processes, **kwargs)


def plan_training(method: Method | str, members: int, settings: TrainingFile | None = None,
                  *, processes: int | None = None, seed: int | None = None,
                  device: str | None = None, kernels: str | None = None) -> TrainingPlan:
    """One setup for every entry point (``bayesal train``, a campaign round): the number of
    models for ``method``, the processes x threads that fit the CPU share, ``seed`` (when
    given) as the training seed and ``device`` (when given) instead of the settings'."""
    method = Method(method)
    settings = settings or TrainingFile()
    n_models = members if method is Method.ENSEMBLE else 1
    if n_models < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    if seed is not None:
        settings = settings.model_copy(update={
            "train": settings.train.model_copy(update={"seed": seed})})
    if device is not None:
        settings = settings.model_copy(update={"device": check_device(device, "--device")})
    if kernels is not None:
        settings = settings.model_copy(update={"kernels": check_kernels(kernels)})
    procs, threads = plan_processes(n_models, processes, settings.train.threads)
    return TrainingPlan(method, n_models, procs, threads, settings)


def load_posterior(directory: str | Path, *, samples: int | None = None,
                   seed: int = 0, device: torch.device | str = "cpu",
                   kernels: str = "e3nn") -> Posterior:
    """The posterior stored in a model directory (its manifest says which method), on
    ``device`` (a torch device or a setting such as ``auto``: see bayes_model.device), its
    tensor products computed by ``kernels`` (bayes_model.kernels).

    The returned object has ``predict(images) -> Prediction`` (raw variances),
    ``manifest`` and ``recalibration`` (None when none was fitted). ``samples`` overrides
    the number of weight samples of SWAG/IVON.
    """
    manifest = read_manifest(directory)
    try:
        method = Method(manifest.method)
    except ValueError:
        raise CheckpointError(f"{directory}: posterior method {manifest.method!r} is not "
                              f"supported by this bayesal (known: {', '.join(Method)})") from None
    if isinstance(device, str):
        device = resolve_device(device)
    posterior: Any
    if method is Method.ENSEMBLE:
        posterior = EnsemblePosterior.load(directory, device, kernels)
    else:
        models, _ = load_members(directory, device, kernels)
        state = load_state_file(directory, manifest.posterior)
        try:
            if method is Method.LAPLACE:
                posterior = LastLayerLaplace.from_state(models[0], state)
            else:
                posterior = SampledPosterior(
                    method.value, models[0], state, seed=seed,
                    samples=samples or int(manifest.posterior.get("samples", 8)))
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{directory}: {method} posterior state does not match the "
                                  f"model ({exc}); refit it") from None
    posterior.manifest = manifest
    posterior.recalibration = Recalibration.load(directory)
    return posterior


def train_posterior(
    method: Method | str,
    train: Sequence[Atoms],
    valid: Sequence[Atoms],
    out_dir: str | Path,
    *,
    settings: TrainingFile | None = None,
    members: int = 4,
    isolated_atoms: str | Path | None = None,
    processes: int | None = None,
    resume: bool = False,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    on_posterior: Callable[[dict[str, float]], None] | None = None,
    recalibrate: bool = True,
    init_from: str | Path | None = None,
    deadline: Deadline | None = None,
) -> Path:
    """Train a model directory for ``method``.

    ensemble: ``members`` models. laplace/swag/ivon: one model (the MAP, trained like an
    ensemble member), then the posterior: Laplace fit on the training set, SWAG collection
    or IVON training continued from it (``on_posterior`` gets their per-epoch records).
    With ``recalibrate`` variance scales are fitted on ``valid`` (calibration.json).
    ``init_from`` warm-starts the members (the MAP model) from a previous model directory
    (see :func:`bayes_model.ensemble.train_ensemble`); the posterior is fitted anew.
    ``deadline`` covers all of it: see :func:`budget_split`.
    """
    method = Method(method)
    settings = settings or TrainingFile()
    out = Path(out_dir)
    train_end, posterior_end = budget_split(method, deadline)
    train_ensemble(train, valid, out, members=members if method is Method.ENSEMBLE else 1,
                   model_config=settings.model, train_config=settings.train,
                   isolated_atoms=isolated_atoms, processes=processes, resume=resume,
                   on_epoch=on_epoch, init_from=init_from, deadline=train_end,
                   device=settings.device, kernels=settings.kernels)
    if method is not Method.ENSEMBLE:
        fit_posterior(method, out, train, valid, out, settings=settings,
                      on_posterior=on_posterior, recalibrate=False, deadline=posterior_end)
    if recalibrate:
        _recalibrate(out, train, valid, settings)
    posterior = load_posterior(out, device=settings.device, kernels=settings.kernels)
    assess(posterior, train, valid, members=posterior.manifest.members,
           min_epochs=settings.train.min_epochs).save(out)
    if settings.train.keep_train_state == "none":
        shutil.rmtree(out / "work", ignore_errors=True)  # finished: nothing to resume
    return out


def fit_posterior(
    method: Method | str,
    map_dir: str | Path,
    train: Sequence[Atoms],
    valid: Sequence[Atoms],
    out_dir: str | Path,
    *,
    settings: TrainingFile | None = None,
    on_posterior: Callable[[dict[str, float]], None] | None = None,
    recalibrate: bool = True,
    deadline: Deadline | None = None,
) -> Path:
    """A laplace/swag/ivon model directory from a trained single-model directory
    (``map_dir``, e.g. ``bayesal train --members 1``); ``out_dir`` may equal ``map_dir``."""
    method = Method(method)
    if method is Method.ENSEMBLE:
        raise ValueError("an ensemble is trained, not fitted: use train_posterior")
    settings = settings or TrainingFile()
    models, manifest = load_members(map_dir, resolve_device(settings.device), settings.kernels)
    if len(models) != 1:
        raise ValueError(f"{map_dir} holds {len(models)} models; {method} starts from one "
                         "trained model (train with --members 1)")
    model = models[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_g = [atoms_to_graph(a, model.species, model.config.cutoff) for a in train]
    valid_g = [atoms_to_graph(a, model.species, model.config.cutoff) for a in valid]
    cfg = settings.posterior
    entry_extra: dict[str, Any] = {}
    if method is Method.LAPLACE:
        laplace = LastLayerLaplace.fit(model, train_g, config=cfg.laplace, valid=valid_g)
        state = laplace.state()
        entry_extra["prior_precision"] = laplace.prior_precision
    elif method is Method.SWAG:
        collector = collect_swag(model, train_g, settings.train, cfg.swag,
                                 on_epoch=on_posterior, valid=valid_g, deadline=deadline)
        state = collector.state(cfg.swag.diagonal)
        load_flat(model, collector.mean)  # the member file holds the SWA mean
        entry_extra.update(samples=cfg.swag.samples, snapshots=collector.n)
    else:
        model, state = train_ivon(model, train_g, valid_g, settings.train, cfg.ivon,
                                  on_epoch=on_posterior, deadline=deadline)
        entry_extra["samples"] = cfg.ivon.samples
    entry = {**save_state_file(out, f"{method.value}.pt", state), **entry_extra}
    extra = {**manifest.extra,
             "posterior_config": getattr(cfg, method.value).model_dump(mode="json")}
    save_members(out, [model.eval()], method=method.value,
                 seeds=[m.get("seed") for m in manifest.members],
                 member_info=[{k: v for k, v in m.items() if k not in ("file", "sha256", "seed")}
                              for m in manifest.members],
                 extra=extra, posterior=entry)
    if recalibrate:
        _recalibrate(out, train, valid, settings)
    return out


# Share of a budget kept for the work after training: saving, the validation predictions of
# the recalibration and the verdict on the model (bayes_model.quality) (5..30 s); and the
# Laplace fit (one pass over the training set) or the
# SWAG/IVON epochs after the model is trained.
FINISH_SHARE, FINISH_MIN_S, FINISH_MAX_S = 0.04, 5.0, 30.0
POSTERIOR_SHARE = {Method.LAPLACE: 0.1, Method.SWAG: 0.3, Method.IVON: 0.3}


def budget_split(method: Method, deadline: Deadline | None,
                 ) -> tuple[Deadline | None, Deadline | None]:
    """(end of model training, end of posterior fitting) within ``deadline``: a reserve of
    FINISH_SHARE of the time left (5-30 s) for saving, recalibration and the verdict, and
    POSTERIOR_SHARE of the rest for the posterior fit after the model is trained."""
    if deadline is None:
        return None, None
    left = max(deadline.remaining(), 0.0)
    posterior_end = deadline.minus(min(FINISH_MAX_S, max(FINISH_MIN_S, FINISH_SHARE * left)))
    share = POSTERIOR_SHARE.get(method, 0.0)
    return posterior_end.minus(share * max(posterior_end.remaining(), 0.0)), posterior_end


def describe_budget(method: Method | str, minutes: float, members: int, processes: int,
                    shared_start: float = 0.0) -> str:
    """How :func:`budget_split`, an ensemble's shared start and its waves divide a budget
    (progress output)."""
    method = Method(method)
    train_end, posterior_end = budget_split(method, Deadline.after(minutes))
    train_s = train_end.remaining()
    finish_s = 60 * minutes - posterior_end.remaining()
    members = members if method is Method.ENSEMBLE else 1
    shared_s = shared_start * train_s if members > 1 else 0.0
    waves = -(-members // max(1, min(processes, members)))
    at_once = f"{processes} member{'s' * (processes > 1)}"
    text = f"budget {minutes:.2f} min: training {train_s / 60:.2f} min"
    parts = []
    if shared_s:
        parts.append(f"{shared_s / 60:.2f} min on the model all members start from")
    if waves > 1:
        parts.append(f"{waves} waves of {at_once}, {(train_s - shared_s) / 60 / waves:.2f} "
                     "min each")
    elif shared_s:
        parts.append(f"{(train_s - shared_s) / 60:.2f} min for the members")
    text += f" ({', then '.join(parts)})" if parts else ""
    if method is not Method.ENSEMBLE:
        text += f", {method.value} {(posterior_end.remaining() - train_s) / 60:.2f} min"
    return text + f", {finish_s:.0f} s kept for saving, calibration and the check"


ALEATORIC_FIT_MAX = 2000  # training structures the aleatoric scales are fitted on (evenly spaced)


def _recalibrate(out: Path, train: Sequence[Atoms], valid: Sequence[Atoms],
                 settings: TrainingFile) -> None:
    posterior = load_posterior(out, device=settings.device, kernels=settings.kernels)
    aleatoric_on = None
    if settings.posterior.recal_aleatoric:
        some = list(train)[:: max(1, -(-len(train) // ALEATORIC_FIT_MAX))]
        aleatoric_on = (posterior.predict(some), some)
    recal = fit_recalibration(posterior.predict(valid), valid,
                              isotonic=settings.posterior.isotonic,
                              prior_weight=settings.posterior.recal_prior_weight,
                              aleatoric_on=aleatoric_on)
    recal.save(out)
