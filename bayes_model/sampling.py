"""Sampling posteriors over all weights: SWAG and IVON.

Both continue from a trained (MAP) model and predict by drawing S weight sets; the samples'
outputs are moment-matched into the prediction contract (``combine_samples``).

SWAG (Maddox et al. 2019): after ``burn_in_epochs`` at a constant (or per-epoch cosine
cyclic) learning rate, one snapshot θ_n per epoch updates the running moments
θ̄ = mean θ_n, θ²‾ = mean θ_n² and keeps the last K deviation columns θ_n − θ̄_n.
Sample: θ = θ̄ + Σ_diag^½ z₁/√2 + D z₂/√(2(K−1)), Σ_diag = θ²‾ − θ̄² (diagonal mode:
θ = θ̄ + Σ_diag^½ z₁).

IVON (Shen et al. 2024, ``ivon-opt``): variational online Newton; posterior N(m, diag σ²)
with σ² = 1 / (ess (h + weight_decay)). Training samples weights inside
``optimizer.sampled_params``; its pitfalls are handled here: parameters without gradients
get zero gradients, and an exception inside a sampled step restores the mean weights and
records nothing (ivon-opt itself leaves the sampled weights in place).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from ase import Atoms
from pydantic import BaseModel, ConfigDict, Field

from bayesal.bayes_model.data import Graph
from bayesal.bayes_model.model import MVEPotential
from bayesal.bayes_model.predict import OneModelProperties, Prediction, predict_members
from bayesal.bayes_model.resources import Deadline
from bayesal.bayes_model.train import TrainConfig, evaluate_graphs, train_epoch, train_model

__all__ = ["IVONConfig", "SWAGCollector", "SWAGConfig", "SampledPosterior", "collect_swag",
           "flat_params", "ivon_sampled_params", "load_flat", "train_ivon"]


class SWAGConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(20, ge=2, description="Collection epochs (one snapshot each).")
    burn_in_epochs: int = Field(2, ge=0, description="Epochs before the first snapshot.")
    lr: float = Field(1e-3, gt=0, description="Constant (or cyclic maximum) learning rate.")
    schedule: str = Field("constant", pattern="^(constant|cyclic)$",
                          description="constant, or cyclic: cosine from lr to lr/10 per epoch.")
    max_rank: int = Field(20, ge=2, description="Deviation columns K kept.")
    diagonal: bool = Field(False, description="Diagonal covariance only.")
    samples: int = Field(8, ge=2, description="Weight samples S at prediction.")
    max_minutes: float | None = Field(None, gt=0, description="Wall-time budget.")


class IVONConfig(BaseModel):
    """Defaults chosen on acac (C8 model warm-started from Adam): lr 1e-4, h₀ 1e3, β₂ 0.95
    improved the force MAE and gave force Spearman 0.84; ivon-opt's defaults (lr 0.1-ish,
    β₂ 0.99999) or lr >= 1e-3 diverged (SGD-like steps on force-NLL gradients)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(30, ge=1, description="IVON epochs (from the trained model).")
    lr: float = Field(1e-4, gt=0, description="IVON learning rate.")
    ess: float | None = Field(None, gt=0, description="Effective sample size (default: "
                              "number of training structures).")
    hess_init: float = Field(1000.0, gt=0, description="Initial Hessian estimate h₀.")
    beta1: float = Field(0.9, ge=0, le=1, description="Gradient momentum.")
    beta2: float = Field(0.95, ge=0, le=1, description="Hessian averaging: fast, so h "
                         "reaches the curvature of the trained model within tens of steps.")
    weight_decay: float = Field(1e-4, ge=0, description="Prior precision per datum.")
    clip_radius: float = Field(0.01, gt=0, description="Clip of the preconditioned step "
                               "(per weight, before lr·h₀): keeps early steps bounded.")
    samples: int = Field(8, ge=2, description="Weight samples S at prediction.")
    max_minutes: float | None = Field(None, gt=0, description="Wall-time budget.")


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    """All parameters in ``model.parameters()`` order as one float64 vector."""
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


@torch.no_grad()
def load_flat(model: torch.nn.Module, theta: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.copy_(theta[offset:offset + n].view_as(p).to(p.dtype))
        offset += n
    if offset != theta.numel():
        raise ValueError(f"weight vector of {theta.numel()} values for {offset} parameters")


class SWAGCollector:
    """Running first/second moments and the last K deviation columns."""

    def __init__(self, n_params: int, max_rank: int,
                 device: torch.device | str = "cpu") -> None:
        self.n = 0  # moments live where the model trains (bayes_model.device)
        self.mean = torch.zeros(n_params, dtype=torch.float64, device=device)
        self.sq_mean = torch.zeros(n_params, dtype=torch.float64, device=device)
        self.deviations: deque[torch.Tensor] = deque(maxlen=max_rank)

    def collect(self, theta: torch.Tensor) -> None:
        theta = theta.double()
        self.n += 1
        self.mean += (theta - self.mean) / self.n
        self.sq_mean += (theta**2 - self.sq_mean) / self.n
        self.deviations.append(theta - self.mean)

    @property
    def variance(self) -> torch.Tensor:
        return torch.clamp(self.sq_mean - self.mean**2, min=1e-30)

    def state(self, diagonal: bool) -> dict:
        dev = (torch.stack(list(self.deviations)) if self.deviations
               else torch.zeros(0, self.mean.numel(), dtype=torch.float64,
                                device=self.mean.device))
        return {"kind": "swag", "n": self.n, "mean": self.mean, "sq_mean": self.sq_mean,
                "deviations": dev, "diagonal": diagonal}


def swag_sampler(state: dict) -> Callable[[torch.Generator], torch.Tensor]:
    mean, var = state["mean"], torch.clamp(state["sq_mean"] - state["mean"] ** 2, min=1e-30)
    dev, diagonal = state["deviations"], bool(state["diagonal"])
    k = dev.shape[0]

    def draw(gen: torch.Generator) -> torch.Tensor:
        z1 = torch.randn(mean.shape, generator=gen, dtype=torch.float64)
        if diagonal or k < 2:
            return mean + var.sqrt() * z1
        z2 = torch.randn(k, generator=gen, dtype=torch.float64)
        return mean + var.sqrt() * z1 / math.sqrt(2) + dev.T @ z2 / math.sqrt(2 * (k - 1))
    return draw


def collect_swag(model: MVEPotential, train: Sequence[Graph], train_config: TrainConfig,
                 config: SWAGConfig, *,
                 on_epoch: Callable[[dict[str, float]], None] | None = None,
                 on_snapshot: Callable[[torch.Tensor], None] | None = None,
                 valid: Sequence[Graph] | None = None,
                 deadline: Deadline | None = None) -> SWAGCollector:
    """Continue training ``model`` with Adam at the SWAG learning rate and collect moments
    (until ``deadline``, once 2 snapshots are in)."""
    generator = torch.Generator().manual_seed(train_config.seed + 7919)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    lr_at = None
    if config.schedule == "cyclic":
        def lr_at(frac: float) -> float:
            return config.lr / 10 + 0.5 * (config.lr - config.lr / 10) * (
                1 + math.cos(math.pi * frac))
    collector = SWAGCollector(sum(p.numel() for p in model.parameters()), config.max_rank,
                              device=next(model.parameters()).device)
    start, epoch_s = time.perf_counter(), 0.0
    for epoch in range(config.burn_in_epochs + config.epochs):
        if collector.n >= 2 and (
                (config.max_minutes is not None
                 and time.perf_counter() - start > 60 * config.max_minutes)
                or (deadline is not None and deadline.remaining() < epoch_s)):
            break
        t_epoch = time.perf_counter()
        losses, _ = train_epoch(model, train, optimizer, train_config,
                                kind=train_config.loss, generator=generator, lr_at=lr_at)
        record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else math.nan,
                  "snapshots": collector.n}
        if epoch >= config.burn_in_epochs:
            theta = flat_params(model)
            collector.collect(theta)
            record["snapshots"] = collector.n
            if on_snapshot is not None:
                on_snapshot(theta)
        if valid:
            record.update({f"valid_{k}": v for k, v in evaluate_graphs(model, valid).items()})
        if on_epoch is not None:
            on_epoch(record)
        epoch_s = time.perf_counter() - t_epoch
    if collector.n < 2:
        raise RuntimeError("SWAG collected fewer than 2 snapshots; raise epochs or the budget")
    return collector


@contextlib.contextmanager
def ivon_sampled_params(optimizer, *, train: bool = True) -> Iterator[None]:
    """``optimizer.sampled_params`` made safe (see the module docstring)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p is not None]
    saved = [p.data for p in params]  # the mean; sampling replaces .data, not these tensors
    param_avg, noise = optimizer._sample_params()
    completed = False
    try:
        yield
        completed = True
    finally:
        if completed and train and any(p.grad is not None for p in params):
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            optimizer._restore_param_average(train, param_avg, noise)
        else:  # exception or skipped step: back to the mean, record nothing
            for p, mean in zip(params, saved, strict=True):
                p.data = mean


def ivon_state(optimizer) -> dict:
    stds = []
    for group in optimizer.param_groups:
        stds.append(1.0 / torch.sqrt(group["ess"] * (group["hess"] + group["weight_decay"])))
    return {"kind": "ivon", "std": torch.cat(stds).double(),
            "ess": float(optimizer.param_groups[0]["ess"])}


def ivon_sampler(mean: torch.Tensor, state: dict) -> Callable[[torch.Generator], torch.Tensor]:
    std = state["std"]

    def draw(gen: torch.Generator) -> torch.Tensor:
        return mean + std * torch.randn(mean.shape, generator=gen, dtype=torch.float64)
    return draw


def train_ivon(model: MVEPotential, train: Sequence[Graph], valid: Sequence[Graph],
               train_config: TrainConfig, config: IVONConfig, *,
               on_epoch: Callable[[dict[str, float]], None] | None = None,
               deadline: Deadline | None = None) -> tuple[MVEPotential, dict]:
    """IVON training continued from ``model``; returns the mean model and the posterior
    state (per-weight std)."""
    import ivon

    dtype = torch.float64 if train_config.float64 else torch.float32
    model = model.to(dtype)
    optimizer = ivon.IVON(list(model.parameters()), lr=config.lr,
                          ess=config.ess or float(len(train)), hess_init=config.hess_init,
                          beta1=config.beta1, beta2=config.beta2,
                          weight_decay=config.weight_decay, clip_radius=config.clip_radius)
    cfg = train_config.model_copy(update={
        "ema_decay": 0.0, "warmup_epochs": 0, "max_epochs": config.epochs, "lr": config.lr,
        "max_minutes": config.max_minutes, "patience": config.epochs + 1})
    result = train_model(model, train, valid, cfg, optimizer=optimizer, on_epoch=on_epoch,
                         sample_context=lambda: ivon_sampled_params(optimizer),
                         keep_best=False, deadline=deadline)
    state = ivon_state(optimizer)
    if not (torch.isfinite(flat_params(result.model)).all() and torch.isfinite(state["std"]).all()):
        raise RuntimeError("IVON diverged (non-finite weights); lower posterior.ivon.lr or "
                           "clip_radius, or start from a better-trained model")
    return result.model, state


class SampledPosterior(OneModelProperties):
    """S weight sets drawn once (seeded) around a mean model; predicts like an ensemble."""

    def __init__(self, method: str, mean_model: MVEPotential, state: dict, *,
                 samples: int = 8, seed: int = 0) -> None:
        self.method, self.model, self.state = method, mean_model.eval(), state
        # Weights are drawn on the host with a CPU generator (states load onto the host),
        # so a posterior draws the same samples on every device.
        mean = flat_params(mean_model).cpu()
        state = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        if method == "swag":
            if state["mean"].numel() != mean.numel():
                raise ValueError(f"SWAG state has {state['mean'].numel()} weights, the model "
                                 f"{mean.numel()}")
            draw = swag_sampler(state)
        elif method == "ivon":
            if state["std"].numel() != mean.numel():
                raise ValueError(f"IVON state has {state['std'].numel()} weights, the model "
                                 f"{mean.numel()}")
            draw = ivon_sampler(mean, state)
        else:
            raise ValueError(f"unknown sampling posterior {method!r}")
        gen = torch.Generator().manual_seed(seed)
        self.models = []
        for _ in range(samples):
            m = copy.deepcopy(mean_model)
            load_flat(m, draw(gen))
            self.models.append(m.eval())

    def predict(self, images: Sequence[Atoms], *, batch_size: int = 32,
                max_atoms: int = 4096) -> Prediction:
        return predict_members(self.models, images, batch_size=batch_size, max_atoms=max_atoms)
