"""Training one mean-variance potential: Adam(amsgrad), plateau LR schedule, EMA of weights,
validation every epoch, early stopping, a wall-time budget, best weights by validation force
MAE, resumable, deterministic under a seed."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from bayesal.bayes_model import _keys as K
from bayesal.bayes_model.data import Graph, batch_graphs, iter_batches
from bayesal.bayes_model.device import model_device
from bayesal.bayes_model.errors import DeviceError
from bayesal.bayes_model.losses import (
    LossKind,
    NLLMode,
    compute_loss,
    gaussian_nll_energy,
    gaussian_nll_forces,
)
from bayesal.bayes_model.model import ModelConfig, MVEPotential
from bayesal.bayes_model.resources import Deadline, earliest

__all__ = ["TrainConfig", "TrainResult", "build_model", "evaluate_graphs", "train_epoch",
           "train_model"]

STATE_FILE = "train_state.pt"


class TrainConfig(BaseModel):
    """How to train one model (an ensemble trains each member with its own seed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    loss: LossKind = Field(LossKind.NLL_JEF, description="nll_jef, nll_e or mse.")
    lambda_e: float = Field(1.0, ge=0, description="Weight of the energy term (MSE: of the "
                            "per-atom energy error).")
    lambda_f: float = Field(1.0, ge=0, description="Weight of the force term (MSE: of the "
                            "force component error).")
    nll_mode: NLLMode = Field(NLLMode.SEPARATE, description=(
        "separate: the means are fitted by the MSE loss and the variance heads by the NLL on "
        "detached features and means (the NLL never pulls the network away from the data); "
        "joint: one NLL for means and variances (the seed's; loses force accuracy)."))
    nll_beta: float = Field(0.0, ge=0, le=1, description="β-NLL exponent in joint mode "
                            "(Seitzer et al. 2022; 0: plain NLL).")
    warmup_epochs: int = Field(0, ge=0, description="Epochs of MSE before the NLL loss.")
    lr: float = Field(1e-2, gt=0, description="Initial learning rate.")
    lr_factor: float = Field(0.5, gt=0, lt=1, description="LR reduction on plateau.")
    lr_patience: int = Field(8, ge=0, description="Epochs without improvement before a cut.")
    min_lr: float = Field(1e-5, gt=0, description="Stop when the LR falls below this.")
    batch_size: int = Field(5, ge=1, description="Structures per training batch.")
    max_epochs: int = Field(1000, ge=1, description="Upper bound on epochs.")
    max_minutes: float | None = Field(None, gt=0, description="Wall-time budget.")
    patience: int = Field(40, ge=1, description="Early stopping: epochs without a better "
                          "validation force MAE.")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA of weights (0: off).")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty (Adam weight_decay).")
    grad_clip: float | None = Field(None, gt=0, description=(
        "Clip each step's gradient to this L2 norm over all parameters (None: no "
        "clipping)."))
    shared_start: float = Field(0.75, ge=0, lt=1, description=(
        "Ensembles: fraction of the training budget (wall time, or max_epochs without one) "
        "spent on one model that every member then continues from with its own seed, data "
        "order and a fresh optimiser; 0: members start from their own random weights."))
    seed: int = Field(0, description="Seeds initial weights and data order.")
    float64: bool = Field(False, description="Train in double precision.")
    min_epochs: int = Field(5, ge=1, description=(
        "A model whose training the time budget stopped before this many epochs is "
        "under-trained (an error unless allow_undertrained)."))
    allow_undertrained: bool = Field(False, description=(
        "Hand out a model although it is under-trained (no better than the mean energy per "
        "atom or zero forces, or stopped before min_epochs): a warning instead of an error."))
    refit_energy_shifts: bool = Field(True, description=(
        "After training, add to the per-species energy shifts the least-squares fit of the "
        "training energy residuals (removes a constant energy offset; forces unchanged)."))
    threads: int | None = Field(None, ge=1, description="torch threads (None: torch default).")
    keep_train_state: Literal["all", "last", "none"] = Field("last", description=(
        "Resumable training state (OUT/work, several times the model's size) once a model "
        "is finished: none deletes it; last keeps only the newest campaign round's; all "
        "keeps every one."))


@dataclass
class TrainResult:
    model: MVEPotential  # best (EMA) weights, eval mode
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: str = ""  # why training ended


class EMA:
    """Exponential moving average of a model's parameters (buffers are not averaged), with
    the usual warm-up: update n uses decay min(decay, (1 + n)/(10 + n)), so early averages
    follow the fast-moving weights instead of dragging the initial ones along."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        names = [n for n, _ in model.named_parameters()]
        torch._foreach_lerp_([self.shadow[n] for n in names],
                             [p.detach() for _, p in model.named_parameters()], 1 - decay)
        self.updates += 1

    def state(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load(self, state: dict) -> None:
        if "shadow" not in state:  # saved before the warm-up existed: past it
            state = {"shadow": state, "updates": 10**9}
        device = next(iter(self.shadow.values())).device if self.shadow else None
        self.shadow = {n: t.to(device) for n, t in state["shadow"].items()}
        self.updates = int(state["updates"])

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """Temporarily put the averaged weights into ``model``."""
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(saved[n])


def evaluate_graphs(model: MVEPotential, graphs: Sequence[Graph], *, batch_size: int = 32,
                    ) -> dict[str, float]:
    """Energy/force MAE and Gaussian NLL of a model on labelled graphs."""
    dtype, device = next(model.parameters()).dtype, model_device(model)
    e_err, f_err, e_nll, f_nll, n_atoms = [], [], [], [], []
    model.eval()
    for idx in iter_batches(graphs, batch_size=batch_size):
        batch = batch_graphs([graphs[i] for i in idx], dtype=dtype, device=device)
        out = model(batch)
        e_err.append((out["energy"] - batch[K.ENERGY]).detach())
        f_err.append((out["forces"] - batch[K.FORCES]).detach())
        e_nll.append(gaussian_nll_energy(out["energy"], out["energy_var"],
                                         batch[K.ENERGY]).detach())
        f_nll.append(gaussian_nll_forces(out["forces"], out["forces_cov"],
                                         batch[K.FORCES]).detach())
        n_atoms.append(batch[K.N_ATOMS])
    e, f = torch.cat(e_err), torch.cat(f_err)
    n = torch.cat(n_atoms).to(e.dtype)
    return {
        "energy_mae": float(e.abs().mean()), "energy_mae_per_atom": float((e.abs() / n).mean()),
        "force_mae": float(f.abs().mean()), "force_rmse": float(f.pow(2).mean().sqrt()),
        "nll": float(0.5 * torch.cat(e_nll).mean() + 0.5 * torch.cat(f_nll).mean()),
    }


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_model(
    model: MVEPotential,
    train: Sequence[Graph],
    valid: Sequence[Graph],
    config: TrainConfig,
    *,
    work_dir: str | Path | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    sample_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    keep_best: bool = True,
    deadline: Deadline | None = None,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train ``model`` (already initialised) on labelled graphs, on ``device`` (default:
    where the model is; see bayes_model.device).

    With ``work_dir`` the full training state is written there after every epoch
    (atomically), and ``resume=True`` continues from it. ``on_epoch`` receives a dict with
    epoch, lr, train loss and validation metrics after every epoch. ``optimizer`` replaces
    Adam (built on the model's parameters, model already in the training dtype) and
    ``sample_context`` wraps every forward/backward pass (IVON's weight sampling);
    ``keep_best=False`` returns the final weights instead of the best ones.

    Time: training ends by ``deadline`` (wall clock) and by ``config.max_minutes`` of
    training time, whichever comes first, checked before every batch: an epoch that would
    overrun is cut short, validated, and training stops ("time budget").
    """
    if not train or not valid:
        raise ValueError("training needs at least one training and one validation structure")
    if config.threads:
        torch.set_num_threads(config.threads)
    dtype = torch.float64 if config.float64 else torch.float32
    model = model.to(dtype=dtype, device=device)
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, amsgrad=True,
                                     weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience)
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
    generator = torch.Generator().manual_seed(config.seed)
    state = {"epoch": 0, "best": math.inf, "best_epoch": -1, "best_state": None,
             "best_metrics": {}, "history": [], "elapsed": 0.0}
    path = Path(work_dir) / STATE_FILE if work_dir is not None else None
    if resume and path is not None and path.exists():
        try:
            # On the host first: the generator state must stay a CPU tensor, and a state
            # written on a GPU resumes on the CPU (and the other way round).
            saved = torch.load(path, weights_only=True, map_location="cpu")
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if ema is not None and saved.get("ema") is not None:
                ema.load(saved["ema"])
            generator.set_state(saved["generator"])
            state.update({k: saved[k] for k in state})
        except Exception as exc:  # truncated by a kill mid-copy, edited, another model
            from bayesal.bayes_model.checkpoint import CheckpointError

            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise CheckpointError(f"{path} cannot be resumed ({type(exc).__name__}: {first}); "
                                  "delete it to train this member anew, or train without "
                                  "--resume") from None
    start = time.perf_counter() - state["elapsed"]
    end = earliest(deadline, None if config.max_minutes is None else
                   Deadline(time.time() - state["elapsed"] + 60 * config.max_minutes))
    clock = _StepClock(end)
    stopped = "max_epochs"
    while state["epoch"] < config.max_epochs:
        if clock.no_time_for_a_step():
            stopped = "time budget"
            break
        t_epoch = time.perf_counter()
        epoch = state["epoch"]
        kind = LossKind.MSE if epoch < config.warmup_epochs else config.loss
        force_error = [0.0, 0]
        try:
            losses, skipped = train_epoch(model, train, optimizer, config, kind=kind,
                                          generator=generator, ema=ema,
                                          sample_context=sample_context, clock=clock,
                                          force_error=force_error)
        except torch.cuda.OutOfMemoryError:
            largest = max(g.n_atoms for g in train)
            raise DeviceError(
                f"out of GPU memory on {model_device(model)} training batches of "
                f"{config.batch_size} structures (up to {largest} atoms each): lower "
                "train.batch_size, or put fewer members on each GPU") from None
        t_eval = time.perf_counter()
        with ema.applied(model) if ema is not None else contextlib.nullcontext(model):
            metrics = evaluate_graphs(model, valid)
            best_candidate = {k: v.detach().clone() for k, v in model.state_dict().items()}
        clock.eval_seconds = time.perf_counter() - t_eval
        scheduler.step(metrics["force_mae"])
        lr = optimizer.param_groups[0]["lr"]
        record = {"epoch": epoch, "lr": lr, "loss": float(np.mean(losses)) if losses else math.nan,
                  "loss_kind": kind.value, "skipped_batches": skipped,
                  "train_force_mae": float(force_error[0]) / max(force_error[1], 1),
                  **{f"valid_{k}": v for k, v in metrics.items()}}
        state["history"].append(record)
        if metrics["force_mae"] < state["best"]:
            state.update(best=metrics["force_mae"], best_epoch=epoch, best_metrics=metrics,
                         best_state=best_candidate)
        state["epoch"] = epoch + 1
        record["seconds"] = time.perf_counter() - t_epoch
        state["elapsed"] = time.perf_counter() - start
        if path is not None:
            _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(),
                          "ema": ema.state() if ema is not None else None,
                          "generator": generator.get_state(), **state}, path)
        if on_epoch is not None:
            on_epoch(record)
        if epoch - state["best_epoch"] >= config.patience:
            stopped = "early stopping"
            break
        if lr < config.min_lr:
            stopped = "learning rate below min_lr"
            break
    best = model
    if keep_best and state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    if config.refit_energy_shifts and refit_energy_shifts(model, train):
        state["best_metrics"] = evaluate_graphs(model, valid)  # the energies moved
    if not state["best_metrics"]:  # no epoch fitted in the budget: validate the weights as
        state["best_metrics"] = evaluate_graphs(model, valid)  # they are (a warm start's)
    best.eval()
    return TrainResult(model=best, best_epoch=state["best_epoch"],
                       best_metrics=state["best_metrics"], history=state["history"],
                       stopped=stopped)


REFIT_MAX = 128  # structures (evenly spaced over the training set) the shift refit uses


@torch.no_grad()
def refit_energy_shifts(model: MVEPotential, graphs: Sequence[Graph], *,
                        batch_size: int = 64) -> bool:
    """Add to the model's per-species energy shifts the least-squares correction of its
    energy residuals on ``graphs``, at most ``REFIT_MAX`` of them, evenly spaced
    (E_ref - E_pred ≈ Σ_i δ(Z_i), minimum-norm where the compositions do not tell the
    species apart). Forces are unchanged. Training weighs
    forces far above energies (3N components against one energy), so a short training run
    can leave a constant energy offset: measured on the quickstart's round 0 (7 training
    structures), 0.40 eV of its 0.40 eV energy MAE. Returns False when there is nothing to
    fit (no energies)."""
    labelled = [g for g in graphs if g.energy is not None]
    if not labelled:
        return False
    if len(labelled) > REFIT_MAX:  # a constant offset needs few structures: keep it cheap
        labelled = [labelled[i] for i in np.linspace(0, len(labelled) - 1, REFIT_MAX,
                                                      dtype=int)]
    dtype, device = next(model.parameters()).dtype, model_device(model)
    model.eval()
    residual = []
    for idx in iter_batches(labelled, batch_size=batch_size):
        batch = batch_graphs([labelled[i] for i in idx], dtype=dtype, device=device)
        residual.append((batch[K.ENERGY] - model(batch, forces=False)["energy"]).cpu())
    r = torch.cat(residual).numpy()
    counts = np.stack([np.bincount(g.species, minlength=len(model.species)) for g in labelled])
    delta = np.linalg.lstsq(counts.astype(np.float64), r, rcond=None)[0]
    model.shifts += torch.as_tensor(delta, dtype=model.shifts.dtype, device=model.shifts.device)
    return True


def train_epoch(model: MVEPotential, train: Sequence[Graph], optimizer: torch.optim.Optimizer,
                config: TrainConfig, *, kind: LossKind, generator: torch.Generator,
                ema: EMA | None = None,
                sample_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                lr_at: Callable[[float], float] | None = None,
                clock: _StepClock | None = None,
                force_error: list[float] | None = None) -> tuple[list[float], int]:
    """One pass over ``train`` in a random order; returns batch losses and the number of
    skipped (non-finite) batches. ``lr_at(fraction of the epoch)`` sets the learning rate
    per step (cyclic schedules); ``clock`` ends the pass early when its time is up;
    ``force_error`` ([sum, count]) accumulates the absolute force errors of the batches as
    they were trained (the epoch's running training force MAE, at no extra cost)."""
    dtype, device = next(model.parameters()).dtype, model_device(model)
    model.train()
    order = torch.randperm(len(train), generator=generator).tolist()
    batches = list(iter_batches(train, batch_size=config.batch_size, order=order))

    def prepare(step: int) -> dict[str, torch.Tensor] | None:
        if step >= len(batches):
            return None
        return batch_graphs([train[i] for i in batches[step]], dtype=dtype, device=device)

    losses, skipped = [], 0
    upcoming = prepare(0)
    for step in range(len(batches)):
        if clock is not None and clock.no_time_for_a_step():
            break
        t_step = time.perf_counter()
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step / len(batches))
        batch = upcoming
        with sample_context() if sample_context is not None else contextlib.nullcontext():
            separate = config.nll_mode is NLLMode.SEPARATE
            out = model(batch, training=True, detach_variance=separate)
            loss, _ = compute_loss(out, batch, kind, lambda_e=config.lambda_e,
                                   lambda_f=config.lambda_f, beta=config.nll_beta,
                                   separate=separate)
            optimizer.zero_grad(set_to_none=True)
            # The next batch is built on the host while a GPU still computes this one (the
            # finiteness check below is the step's only wait for the device).
            upcoming = prepare(step + 1)
            if not torch.isfinite(loss):
                skipped += 1  # a bad batch must not poison the weights
                continue
            if force_error is not None:
                err = (out["forces"].detach() - batch[K.FORCES]).abs()
                force_error[0] = force_error[0] + err.sum()  # a tensor: no sync per step
                force_error[1] += err.numel()
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        losses.append(loss.detach())
        if clock is not None:
            clock.step_seconds = time.perf_counter() - t_step
    return (torch.stack(losses).tolist() if losses else []), skipped


class _StepClock:
    """Is there time for one more training step and the validation after it? Keeps the
    last step's and the last validation's duration (1.5x margin for a noisy machine)."""

    def __init__(self, end: Deadline | None) -> None:
        self.end, self.step_seconds, self.eval_seconds = end, 0.0, 0.0

    def no_time_for_a_step(self) -> bool:
        return self.end is not None and self.end.remaining() < 1.5 * (
            self.step_seconds + self.eval_seconds)


def build_model(config: ModelConfig, species: list[int], shifts: Sequence[float],
                graphs: Sequence[Graph], *, seed: int = 0) -> MVEPotential:
    """A freshly initialised model with data-derived scale and neighbour normalisation."""
    torch.manual_seed(seed)
    forces = np.concatenate([g.forces for g in graphs if g.forces is not None])
    scale = float(np.sqrt(np.mean(forces**2))) or 1.0
    n_edges = sum(g.edge_index.shape[1] for g in graphs)
    avg = max(n_edges / max(sum(g.n_atoms for g in graphs), 1), 1.0)
    return MVEPotential(config, list(species), list(map(float, shifts)), scale=scale,
                        avg_neighbors=avg)
