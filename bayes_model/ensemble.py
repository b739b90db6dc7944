"""Deep ensembles of mean-variance potentials: K members, different seeds and data order,
trained by the same code, in parallel processes when cores allow."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms

from bayesal.bayes_model.checkpoint import CheckpointError, load_members, save_members
from bayesal.bayes_model.data import (
    Graph,
    atoms_to_graph,
    energy_shifts_from_isolated,
    energy_shifts_least_squares,
    energy_shifts_with_isolated,
    labels_of,
)
from bayesal.bayes_model.device import member_devices
from bayesal.bayes_model.kernels import use_kernels
from bayesal.bayes_model.model import ModelConfig, MVEPotential
from bayesal.bayes_model.resources import Deadline, plan_processes
from bayesal.bayes_model.train import TrainConfig, build_model, train_model
from bayesal.contracts import die_with_parent

__all__ = [
    "PreparedData",
    "WarmStart",
    "load_warm_start",
    "member_summary",
    "prepare_data",
    "split_validation",
    "split_validation_stable",
    "train_ensemble",
    "warm_start_mismatch",
]


@dataclass
class PreparedData:
    species: list[int]
    shifts: list[float]  # eV per species
    train: list[Graph]
    valid: list[Graph]


def prepare_data(train: Sequence[Atoms], valid: Sequence[Atoms], config: ModelConfig, *,
                 isolated_atoms: str | Path | None = None) -> PreparedData:
    """Species, energy shifts and graphs; every structure must carry energy and forces."""
    for name, images in (("training", train), ("validation", valid)):
        for k, atoms in enumerate(images):
            e, f = labels_of(atoms)
            if e is None or f is None:
                raise ValueError(f"{name} structure {k} has no energy/forces; training needs "
                                 "labelled data")
    species = sorted({int(z) for a in [*train, *valid] for z in a.numbers})
    if isolated_atoms is not None:
        shifts = energy_shifts_with_isolated(
            train, species, energy_shifts_from_isolated(isolated_atoms, species))
    else:
        shifts = energy_shifts_least_squares(train, species)
    graphs = [atoms_to_graph(a, species, config.cutoff) for a in [*train, *valid]]
    return PreparedData(species, [float(s) for s in shifts], graphs[: len(train)],
                        graphs[len(train):])


@dataclass
class WarmStart:
    """Weights to start members from (fine-tuning): the previous model's members, with the
    energy shifts, force scale and neighbour normalisation they were trained with."""

    states: list[dict[str, torch.Tensor]]
    shifts: list[float]
    scale: float
    avg_neighbors: float


def warm_start_mismatch(manifest, model_config: ModelConfig, species: Sequence[int]) -> str:
    """Why a model with ``manifest`` cannot start training of ``model_config`` on
    ``species`` ("" when it can)."""
    if manifest.config != model_config:
        return "its model config differs"
    if list(manifest.species) != list(species):
        return f"it was trained on species {manifest.species}, the data has {list(species)}"
    return ""


def load_warm_start(directory: str | Path, model_config: ModelConfig,
                    species: list[int]) -> WarmStart:
    """The members of model directory ``directory`` as a :class:`WarmStart`; the model
    config and species must be the ones about to be trained (ValueError names the
    difference otherwise: train from scratch instead)."""
    models, manifest = load_members(directory)
    if why := warm_start_mismatch(manifest, model_config, species):
        raise ValueError(f"cannot warm-start from {directory}: {why}; train from scratch")
    return WarmStart([{n: t.detach().cpu() for n, t in m.state_dict().items()} for m in models],
                     list(manifest.shifts), float(manifest.scale), manifest.avg_neighbors)


def _member_job(k: int, data: PreparedData, model_config: ModelConfig, train_config: TrainConfig,
                work_dir: str, resume: bool, threads: int, events=None,
                warm: WarmStart | None = None, deadline: Deadline | None = None,
                device: str = "cpu", kernels: str = "e3nn"):
    events = _EVENTS if events is None else events  # member processes: set by _init_member
    torch.set_num_threads(threads)
    config = train_config.model_copy(update={"seed": train_config.seed + k})
    if warm is None:
        model = build_model(model_config, data.species, data.shifts, data.train,
                            seed=config.seed)
    else:  # member k continues from previous member k (cycled if there were fewer)
        torch.manual_seed(config.seed)
        model = MVEPotential(model_config, data.species, warm.shifts, scale=warm.scale,
                             avg_neighbors=warm.avg_neighbors)
        model.load_state_dict(warm.states[k % len(warm.states)])
    model = use_kernels(model.to(device), kernels)
    member_dir = Path(work_dir) / f"member_{k}"
    member_dir.mkdir(parents=True, exist_ok=True)

    def report(record: dict[str, float]) -> None:
        if events is not None:
            events.put((k, record))

    result = train_model(model, data.train, data.valid, config, work_dir=member_dir,
                         resume=resume, on_epoch=report, deadline=deadline, device=device)
    info = {"best_epoch": result.best_epoch, "stopped": result.stopped, "device": device,
            "epochs": len(result.history), "threads": torch.get_num_threads(),
            "curve": _curve(result.history),
            **{f"valid_{m}": v for m, v in result.best_metrics.items()}}
    return k, {n: t.detach().cpu() for n, t in result.model.state_dict().items()}, info


def train_ensemble(
    train: Sequence[Atoms],
    valid: Sequence[Atoms],
    out_dir: str | Path,
    *,
    members: int = 4,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    isolated_atoms: str | Path | None = None,
    processes: int | None = None,
    resume: bool = False,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    init_from: str | Path | None = None,
    deadline: Deadline | None = None,
    device: str = "auto",
    kernels: str = "e3nn",
) -> Path:
    """Train ``members`` models and write a model directory (see bayes_model.checkpoint).

    ``device`` (auto, cpu, cuda, cuda:K; see bayes_model.device): with ``auto`` or ``cuda``
    member k trains on visible GPU k mod n, with ``cuda:K`` every member on GPU K.
    ``kernels``: the code of the tensor products (bayes_model.kernels).

    Member k uses seed ``train_config.seed + k`` for its weights and data order. Members
    train in parallel processes (spawned) within the CPU share of this process
    (:func:`bayes_model.resources.plan_processes`: at most ``processes`` of them, and
    processes x threads never above the share; ``train_config.threads`` caps the threads of
    each). ``deadline`` (wall clock) ends training: members that run in waves get equal
    slots of the time left. ``resume`` continues interrupted
    members from their saved training state. ``init_from`` (a model directory with the same
    model config and species) warm-starts: member k starts from its member k and keeps its
    energy shifts, force scale and neighbour normalisation (fine-tuning on the new data).
    """
    model_config = model_config or ModelConfig()
    train_config = train_config or TrainConfig()
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    devices = [str(d) for d in member_devices(device, members)]
    procs, threads = plan_processes(members, processes, train_config.threads)
    data = prepare_data(train, valid, model_config, isolated_atoms=isolated_atoms)
    waves, start = -(-members // procs), time.time()

    def member_deadline(k: int) -> Deadline | None:
        return None if deadline is None else deadline.slot(k // procs, waves, start)

    warm, shared_info = None, None
    work = Path(out_dir) / "work"
    if init_from is not None:
        warm = load_warm_start(init_from, model_config, data.species)
        data.shifts = warm.shifts
    elif members > 1 and train_config.shared_start > 0:
        # One model trained on all the CPU share for the first part of the budget; the
        # members continue from it (and the waves share what is left).
        warm, shared_info, train_config = _shared_start(
            data, model_config, train_config, work, resume, deadline, on_epoch,
            plan_processes(1, 1, train_config.threads)[1], devices[0], kernels)
        start = time.time()
    results: dict[int, tuple[dict, dict]] = {}
    if procs == 1:
        for k in range(members):
            _, state, info = _member_job(k, data, model_config, train_config, str(work), resume,
                                         threads, _Direct(on_epoch), warm, member_deadline(k),
                                         devices[k], kernels)
            results[k] = (state, info)
    else:
        ctx = mp.get_context("spawn")
        # A plain queue handed to the members when they start (no Manager: its server process
        # would outlive a SIGKILLed trainer).
        events = ctx.Queue()
        stop = threading.Event()
        pump = threading.Thread(target=_pump, args=(events, on_epoch, stop), daemon=True)
        pump.start()
        pool = ProcessPoolExecutor(max_workers=procs, mp_context=ctx,
                                   initializer=_init_member, initargs=(os.getpid(), events))
        try:
            futures = [pool.submit(_member_job, k, data, model_config, train_config,
                                   str(work), resume, threads, None, warm, member_deadline(k),
                                   devices[k], kernels)
                       for k in range(members)]
            for fut in futures:
                k, state, info = fut.result()
                results[k] = (state, info)
        except BaseException:
            # Interrupted (SIGTERM, Ctrl-C) or a member failed: stop the other members now
            # instead of waiting for them to finish training (their states are saved every
            # epoch; a resumed run continues from them).
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.kill()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        else:
            pool.shutdown()
        finally:
            stop.set()
            pump.join()
            events.close()
    # The neighbour normalisation is a constructor argument, not part of the state dict:
    # rebuild members exactly as they were trained (build_model derives it from the data).
    if shared_info is not None:
        for k in results:
            results[k][1].update(_after_shared(shared_info, results[k][1]))
    if warm is None:
        template = build_model(model_config, data.species, data.shifts, data.train)
        scale, avg_neighbors = float(template.scale), template.avg_neighbors
    else:
        scale, avg_neighbors = warm.scale, warm.avg_neighbors
    models = []
    for k in range(members):
        model = MVEPotential(model_config, data.species, data.shifts,
                             scale=scale, avg_neighbors=avg_neighbors)
        model = model.to(torch.float64 if train_config.float64 else torch.float32)
        model.load_state_dict(results[k][0])
        models.append(model)
    extra = {"train_config": train_config.model_dump(mode="json"),
             "n_train": len(train), "n_valid": len(valid),
             "init_from": None if init_from is None else str(init_from),
             "isolated_atoms": None if isolated_atoms is None else str(isolated_atoms)}
    return save_members(out_dir, models, method="ensemble",
                        seeds=[train_config.seed + k for k in range(members)],
                        member_info=[results[k][1] for k in range(members)], extra=extra)


SHARED_KEY = "start"  # ``on_epoch`` key of the shared start model's epochs


def _shared_start(data: PreparedData, model_config: ModelConfig, train_config: TrainConfig,
                  work: Path, resume: bool, deadline: Deadline | None, on_epoch, threads: int,
                  device: str = "cpu", kernels: str = "e3nn",
                  ) -> tuple[WarmStart, dict, TrainConfig]:
    """Train the model every member starts from (``train_config.shared_start`` of the time
    left, or of ``max_epochs``). Returns it as a :class:`WarmStart`, its training record
    and the members' config (the epochs left). Resumable: a finished start is kept in
    ``work/start/start.pt`` and reused."""
    share = train_config.shared_start
    epochs = max(1, round(share * train_config.max_epochs))
    member_config = train_config.model_copy(
        update={"max_epochs": max(1, train_config.max_epochs - epochs)})
    folder = work / SHARED_KEY
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "start.pt"
    if resume and done.exists():
        try:
            saved = torch.load(done, weights_only=True, map_location="cpu")
            return WarmStart(**saved["warm"]), saved["info"], member_config
        except Exception as exc:
            raise CheckpointError(f"{done} cannot be resumed ({type(exc).__name__}); delete "
                                  "it to train the shared start anew") from None
    torch.set_num_threads(threads)
    model = build_model(model_config, data.species, data.shifts, data.train,
                        seed=train_config.seed)
    model = use_kernels(model.to(device), kernels)
    end = None if deadline is None else Deadline(time.time() + share * deadline.remaining())

    def report(record: dict[str, float]) -> None:
        if on_epoch is not None:
            on_epoch(SHARED_KEY, record)

    result = train_model(model, data.train, data.valid,
                         train_config.model_copy(update={"max_epochs": epochs}),
                         work_dir=folder, resume=resume, on_epoch=report, deadline=end,
                         device=device)
    warm = WarmStart([{n: t.detach().cpu() for n, t in result.model.state_dict().items()}],
                     list(data.shifts), float(result.model.scale), result.model.avg_neighbors)
    info = {"epochs": len(result.history), "best_epoch": result.best_epoch,
            "stopped": result.stopped, "threads": torch.get_num_threads(), "device": device,
            "curve": _curve(result.history)}
    tmp = done.with_name(done.name + ".tmp")
    torch.save({"warm": vars(warm), "info": info}, tmp)
    os.replace(tmp, done)
    return warm, info, member_config


def _curve(history: Sequence[dict[str, float]], offset: float = 0.0) -> list[list[float]]:
    """[training seconds, validation force MAE, energy MAE] per epoch."""
    seconds = offset + np.cumsum([r.get("seconds", np.nan) for r in history])
    return [[round(float(t), 2), r["valid_force_mae"], r["valid_energy_mae"]]
            for t, r in zip(seconds, history, strict=True)]


def _after_shared(shared: dict, member: dict) -> dict:
    """A member's record continued from the shared start: its curve begins with the start
    model's epochs, and the start's epochs are counted."""
    offset = shared["curve"][-1][0] if shared["curve"] else 0.0
    curve = [[round(t + offset, 2), f, e] for t, f, e in member["curve"]]
    return {"shared_epochs": shared["epochs"], "shared_threads": shared["threads"],
            "curve": shared["curve"] + curve}


_EVENTS = None  # progress queue of a member process


def _init_member(parent_pid: int, events) -> None:
    global _EVENTS
    die_with_parent(parent_pid)
    _EVENTS = events


class _Direct:
    """Queue-like adapter that calls the progress callback in process."""

    def __init__(self, callback) -> None:
        self.callback = callback

    def put(self, item) -> None:
        if self.callback is not None:
            self.callback(*item)


def _pump(events, callback, stop: threading.Event) -> None:
    while not stop.is_set() or not events.empty():
        try:
            k, record = events.get(timeout=0.2)
        except (queue.Empty, EOFError, OSError):
            continue
        if callback is not None:
            callback(k, record)


def split_validation(images: Sequence[Atoms], fraction: float, seed: int = 0,
                     ) -> tuple[list[Atoms], list[Atoms]]:
    """Random train/validation split (at least one validation structure)."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(images))
    n_valid = max(1, round(fraction * len(images)))
    valid = [images[i] for i in sorted(order[:n_valid])]
    train = [images[i] for i in sorted(order[n_valid:])]
    return train, valid


def split_validation_stable(images: Sequence[Atoms], keys: Sequence[int | str],
                            fraction: float, seed: int = 0) -> tuple[list[Atoms], list[Atoms]]:
    """Train/validation split where each structure's side depends only on its key (e.g. its
    content hash) and ``seed``: a structure is validation iff a hash of (seed, key) falls
    below ``fraction``. As data grows, no training structure ever moves into validation, so a
    model fine-tuned round after round is validated on structures it has not trained on.
    At least one structure lands on each side (the extremes of the hash) when there are two."""
    import hashlib

    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    if len(keys) != len(images):
        raise ValueError(f"{len(images)} structures but {len(keys)} keys")
    u = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode(),
                                                 digest_size=8).digest(), "big") / 2.0**64
                  for k in keys])
    is_valid = u < fraction
    if len(images) >= 2 and not is_valid.any():
        is_valid[np.argmin(u)] = True
    if len(images) >= 2 and is_valid.all():
        is_valid[np.argmax(u)] = False
    return ([a for a, v in zip(images, is_valid, strict=True) if not v],
            [a for a, v in zip(images, is_valid, strict=True) if v])


def member_summary(directory: str | Path) -> list[dict[str, Any]]:
    """Per-member training summary from a model directory's manifest."""
    from bayesal.bayes_model.checkpoint import read_manifest

    return read_manifest(directory).members
