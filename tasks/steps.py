"""The steps of a campaign as plain functions; the Prefect tasks in tasks/campaign.py and
tasks/labeling.py wrap them, the flow in flows/campaign.py composes them, and the
campaign's rules (when to start, how many labels, when to stop) are tasks/policy.py.

Every step reads the database first and does only what is missing, so a campaign killed
at any point and started again continues from the last complete step:

* sources are imported by structure hash (a re-import adds nothing);
* a round's model is reused once it is registered in ``models`` (interrupted training
  continues from the members' saved states);
* a round's selection is reused once it is marked in ``scores``;
* a structure is labelled only if it has no label (ok or failed) under the labeler's
  settings hash, and each label is stored the moment it is computed.

Nothing here imports Prefect or the flows package; configuration arrives as plain values
and the libraries' config objects (`AcquisitionConfig`, `TrainingFile`).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Engine

from bayesal.contracts import RoundMetric as M
from bayesal.contracts import metric_on_test
from bayesal.db import RoundStatus, StructureSource, ensure_schema, make_engine
from bayesal.db.identity import atoms_hash
from bayesal.db.importer import import_files
from bayesal.db.pool import (
    add_explored,
    draw_structures,
    explored_count,
    iter_unlabelled,
    labelled_atoms,
    set_campaign_config,
)
from bayesal.db.readers import check_files
from bayesal.db.rounds import (
    ModelRow,
    ScoreRow,
    finish_round,
    mark_selected,
    record_models,
    record_scores,
    round_models,
    score_summary,
    selected_structure_ids,
)
from bayesal.tasks.policy import CampaignError

if TYPE_CHECKING:
    from bayesal.bayes_model.acquisition import AcquisitionConfig

__all__ = ["ScoringShard", "ShardResult", "Sources", "engine_for", "evaluate_model",
           "explore_round", "finish_selection", "import_sources", "plan_scoring",
           "score_shard", "select_batch", "stored_selection", "test_set_name", "train_round"]

log = logging.getLogger("bayesal.campaign")


@functools.lru_cache(maxsize=4)
def engine_for(url: str) -> Engine:
    """One engine per database URL and process (tasks may run in threads or on Dask)."""
    return make_engine(url)


def test_set_name(path: str | Path) -> str:
    """Metric-friendly name of a test file: its stem with other characters as ``_``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", Path(path).stem).strip("_").lower() or "test"


@dataclass
class Sources:
    """What a campaign starts from, by structure id."""

    initial: list[int] = field(default_factory=list)  # to label before the first round
    test: dict[str, list[int]] = field(default_factory=dict)  # test set name -> ids
    n_pool: int = 0


def import_sources(engine: Engine, campaign: str, config: dict[str, Any], *,
                   pool_files: Sequence[Path], initial_files: Sequence[Path],
                   test_files: Sequence[Path], initial_random: int | None,
                   seed: int) -> Sources:
    """Create the campaign (storing ``config``), import its files (structures only: labels
    come from the campaign's labeler), and name the structures to label first.

    Re-running it changes nothing: structures are identified by hash, and the random initial
    draw is seeded and made on hash order.
    """
    # all or nothing: a bad frame in any file leaves no campaign row behind
    check_files([*pool_files, *initial_files, *test_files])
    ensure_schema(engine, create=True)
    set_campaign_config(engine, campaign, config)
    out = Sources()
    if pool_files:
        out.n_pool = import_files(engine, list(pool_files), campaign,
                                  source=StructureSource.POOL).n_frames
    if initial_files:
        report = import_files(engine, list(initial_files), campaign,
                              source=StructureSource.INITIAL)
        out.initial = list(dict.fromkeys(report.structure_ids))
    if initial_random:
        out.initial += [i for i in draw_structures(engine, campaign, initial_random, seed)
                        if i not in out.initial]
    for path in test_files:
        report = import_files(engine, [path], campaign, source=StructureSource.TEST)
        out.test.setdefault(test_set_name(path), []).extend(report.structure_ids)
    test_ids = {i for ids in out.test.values() for i in ids}
    if clash := test_ids & set(out.initial):
        raise CampaignError(f"{len(clash)} test structures are also initial training "
                            "structures; test files must be disjoint from initial data")
    return out


def train_round(engine: Engine, campaign: str, round_id: int, round_index: int,
                settings_hash: str, model_dir: Path, *, method: str, members: int,
                settings, valid_fraction: float, seed: int, max_minutes: float | None,
                processes: int | None = None,
                on_epoch: Callable[[int, dict], None] | None = None,
                init_from: Path | None = None, finetune=None) -> dict[str, Any]:
    """Train the round's posterior on every ok label (test set excluded) and register it.

    A round whose model is registered reuses it; interrupted training resumes from the
    members' saved states. ``settings`` is a :class:`bayes_model.config.TrainingFile`.
    ``init_from`` (the previous round's model directory) warm-starts the members, trained
    with ``finetune`` (a TrainConfig) instead of ``settings.train``; when that model is
    missing or has another model config or species, the round trains from scratch
    (``warm_start`` 0 in the summary, the reason in ``warm_start_skipped``).
    """
    from bayesal.bayes_model.checkpoint import read_manifest
    from bayesal.bayes_model.ensemble import split_validation_stable
    from bayesal.bayes_model.posterior import plan_training
    from bayesal.bayes_model.resources import Deadline

    t0 = time.perf_counter()
    deadline = Deadline.after(max_minutes)
    model_dir = Path(model_dir)
    if round_models(engine, round_id) and (model_dir / "manifest.json").is_file():
        manifest = read_manifest(model_dir)  # trained before a restart: nothing to load
        n = manifest.extra.get("n_train", 0) + manifest.extra.get("n_valid", 0)
        return _train_summary(manifest, n, reused=True, seconds=0.0)
    images = labelled_atoms(engine, campaign, settings_hash)
    if len(images) < 2:
        raise CampaignError(f"campaign {campaign!r} has {len(images)} labelled training "
                            "structure(s); at least 2 are needed to train (more initial "
                            "structures, or check the failed labels with `bayesal status`)")
    warm, why_not = _warm_start_source(init_from, settings.model, images)
    base = finetune if warm is not None and finetune is not None else settings.train
    plan = plan_training(method, members, settings.model_copy(update={"train": base}),
                         processes=processes, seed=settings.train.seed + 1000 * round_index)
    # A structure stays on its side of the split in every round (warm-started models must
    # not be validated on what they trained on in an earlier round), keyed by its content so
    # the same structures split alike in every campaign and database.
    train, valid = split_validation_stable(images, [atoms_hash(a) for a in images],
                                           valid_fraction, seed=seed)
    plan.run(train, valid, model_dir, resume=True, on_epoch=on_epoch, init_from=warm,
             deadline=deadline)
    _refuse_undertrained(engine, round_id, round_index, model_dir,
                         allow=plan.settings.train.allow_undertrained)
    manifest = read_manifest(model_dir)
    hyper = {"n_train": len(train), "n_valid": len(valid), "seed": plan.settings.train.seed,
             **({"posterior_file": manifest.posterior.get("file"),
                 "posterior_sha256": manifest.posterior.get("sha256")}
                if manifest.posterior else {})}
    record_models(engine, round_id, manifest.method, [
        ModelRow(k, str(model_dir / m["file"]), m["sha256"], {**hyper, "seed": m.get("seed")})
        for k, m in enumerate(manifest.members)])
    if plan.settings.train.keep_train_state == "last":  # earlier rounds are final
        _drop_train_state(model_dir)
    out = _train_summary(manifest, len(images), reused=False, seconds=time.perf_counter() - t0)
    if why_not:
        out["warm_start_skipped"] = why_not
    return out


def _refuse_undertrained(engine: Engine, round_id: int, round_index: int, model_dir: Path,
                         *, allow: bool) -> None:
    """An under-trained model (:mod:`bayes_model.quality`) is not scored with: the round is
    marked failed with the verdict in its metrics, and CampaignError says what to change
    (``--resume`` then opens the next round, which trains again)."""
    from bayesal.bayes_model.quality import Quality, UndertrainedError, check_trained

    try:
        check_trained(model_dir)
    except UndertrainedError as exc:
        if allow:
            return
        q = Quality.load(model_dir)
        finish_round(engine, round_id, status=RoundStatus.FAILED, n_labelled=0, metrics={
            "failed": "under-trained model", "problems": "; ".join(q.problems),
            "quality_energy_mae": q.energy_mae, "quality_force_mae": q.force_mae,
            "baseline_energy_mae": q.baseline_energy_mae,
            "baseline_force_mae": q.baseline_force_mae, "epochs": q.epochs})
        raise CampaignError(f"round {round_index} failed: {exc}. Change the train section "
                            "(or max_train_minutes) and run with --resume: a new round "
                            "trains again") from None


def _drop_train_state(model_dir: Path) -> None:
    """Delete the resumable training state of the campaign's earlier rounds (their models
    are registered: nothing will resume them)."""
    import shutil

    for work in model_dir.parent.parent.glob("round-*/model/work"):
        if work.parent != model_dir:
            shutil.rmtree(work, ignore_errors=True)


def _warm_start_source(init_from: Path | None, model_config, images) -> tuple[Path | None, str]:
    """``init_from`` when a round can start from it, else None and the reason."""
    if init_from is None:
        return None, ""
    from bayesal.bayes_model.checkpoint import CheckpointError, read_manifest
    from bayesal.bayes_model.ensemble import warm_start_mismatch

    try:
        manifest = read_manifest(init_from)
    except CheckpointError as exc:
        return None, str(exc)
    species = sorted({int(z) for a in images for z in a.numbers})
    if why := warm_start_mismatch(manifest, model_config, species):
        return None, f"{init_from}: {why}"
    return Path(init_from), ""


def _train_summary(manifest, n_labelled: int, *, reused: bool, seconds: float) -> dict:
    members = manifest.members
    return {M.N_TRAIN_LABELS: n_labelled, "reused": reused, M.TRAIN_S: seconds,
            M.VALID_FORCE_MAE: float(np.mean([m["valid_force_mae"] for m in members])),
            M.VALID_ENERGY_MAE: float(np.mean([m["valid_energy_mae"] for m in members])),
            M.WARM_START: float(bool(manifest.extra.get("init_from")))}


def evaluate_model(engine: Engine, campaign: str, settings_hash: str, model_dir: Path,
                   test_sets: dict[str, list[int]], *, device: str = "auto",
                   kernels: str = "e3nn") -> dict[str, float]:
    """Accuracy, NLL and calibration of the round's model on the labelled test structures:
    ``test_*`` over all of them, ``test_<name>_*`` per test file (eV, eV/Å, nats); the model
    runs on ``device`` (auto, cpu, cuda, cuda:K)."""
    from bayesal.bayes_model.calibration import evaluate_prediction
    from bayesal.bayes_model.posterior import load_posterior

    images = labelled_atoms(engine, campaign, settings_hash, test=True)
    if not images:
        return {}
    posterior = load_posterior(model_dir, device=device, kernels=kernels)
    pred = posterior.predict(images)
    recal = posterior.recalibration
    out: dict[str, float] = {}

    def add(test_set: str | None, idx: list[int], reliability: bool = False) -> None:
        sub = [images[i] for i in idx]
        p = pred.subset(idx) if len(idx) < len(images) else pred
        metrics = evaluate_prediction(p, sub, recalibration=recal, reliability=reliability)
        out.update({metric_on_test(k, test_set): v for k, v in metrics.items()})

    add(None, list(range(len(images))), reliability=True)  # curves for the dashboard
    if len(test_sets) > 1:
        position = {a.info["structure_id"]: i for i, a in enumerate(images)}
        for name, ids in test_sets.items():
            idx = [position[i] for i in ids if i in position]
            if idx:
                add(name, idx)
    return out


def explore_round(engine: Engine, campaign: str, round_index: int, settings_hash: str,
                  model_dir: Path, *, temperatures_K: Sequence[float], steps: int,
                  timestep_fs: float, friction_per_fs: float, max_force_std: float,
                  record_every: int, seeds_per_round: int, seed: int,
                  stop_on_break: bool = True, device: str = "auto", kernels: str = "e3nn",
                  ) -> dict[str, float]:
    """Langevin MD with the round's model (on ``device``) from labelled structures; the
    frames become candidates (source ``explored``). Done once per round (all frames in one
    transaction)."""
    from bayesal.bayes_model.explore import explore
    from bayesal.bayes_model.posterior import load_posterior

    if (n := explored_count(engine, campaign, round_index)) > 0:
        return {M.N_EXPLORED: n, "explore_reused": True}
    t0 = time.perf_counter()
    labelled = labelled_atoms(engine, campaign, settings_hash)
    rng = np.random.default_rng(seed + round_index)
    picks = rng.choice(len(labelled), size=min(seeds_per_round, len(labelled)), replace=False)
    seeds = [labelled[i] for i in sorted(picks)]
    trajectories = explore(load_posterior(model_dir, device=device, kernels=kernels), seeds,
                           temperatures_K=temperatures_K,
                           steps=steps, timestep_fs=timestep_fs,
                           friction_per_fs=friction_per_fs,
                           max_force_std_threshold=max_force_std, record_every=record_every,
                           seed=seed + round_index, stop_on_break=stop_on_break)
    items = [(frame, seeds[t.seed_index].info["structure_id"])
             for t in trajectories for frame in t.frames]
    n_new = add_explored(engine, campaign, round_index, items)
    stopped = sum(t.stopped == "uncertain" for t in trajectories)
    return {M.N_EXPLORED: n_new, "explore_trajectories": len(trajectories),
            "explore_stopped_uncertain": stopped,
            "explore_stopped_broken": sum(t.stopped == "broken" for t in trajectories),
            "explore_mean_steps": float(np.mean([t.steps_run for t in trajectories])),
            M.EXPLORE_S: time.perf_counter() - t0}


# Shards scored in one process run one at a time: torch already uses the process's cores
# (the local thread runner would otherwise multiply them); separate Dask worker processes
# score in parallel.
SCORING_LOCK = threading.Lock()


@dataclass(frozen=True)
class ScoringShard:
    """A run of consecutive candidates (in id order) scored by one task."""

    first_index: int  # pool index of its first candidate (random draws, ties)
    first_id: int
    last_id: int
    n: int


@dataclass
class ShardResult:
    """What a scoring task returns: its best candidates (structures dropped, their ids in
    ``structure_ids``), how many it scored, and whether the features are a metric."""

    candidates: list  # scoring.Candidate, atoms None
    structure_ids: list[int]
    n_scored: int
    features_metric: bool


def plan_scoring(engine: Engine, campaign: str, round_id: int, settings_hash: str,
                 acquisition: AcquisitionConfig | dict[str, Any]) -> list[ScoringShard] | None:
    """The round's unlabelled candidates cut into shards of ``acquisition.shard_size``;
    None when the round's selection is stored already (a resumed round)."""
    from bayesal.bayes_model.acquisition import AcquisitionConfig
    from bayesal.db.pool import unlabelled_runs

    acquisition = AcquisitionConfig.model_validate(acquisition)
    if selected_structure_ids(engine, round_id):
        return None
    shards, first = [], 0
    for lo, hi, n in unlabelled_runs(engine, campaign, acquisition.shard_size,
                                     settings_hash=settings_hash):
        shards.append(ScoringShard(first, lo, hi, n))
        first += n
    return shards


def score_shard(engine: Engine, campaign: str, round_id: int, settings_hash: str,
                model_dir: Path, acquisition: AcquisitionConfig | dict[str, Any],
                shard: ScoringShard, *, seed: int, device: str = "auto",
                kernels: str = "e3nn", posterior=None,
                on_chunk: Callable[[int], None] | None = None) -> ShardResult:
    """Score one shard with the round's model (on ``device``; ``posterior``: one loaded
    already), store its scores chunk by chunk (a rerun keeps those stored) and return its
    best candidates, as :func:`bayes_model.scoring.best_candidates` keeps them."""
    from bayesal.bayes_model.acquisition import AcquisitionConfig
    from bayesal.bayes_model.posterior import load_posterior
    from bayesal.bayes_model.scoring import stream_best

    acquisition = AcquisitionConfig.model_validate(acquisition)  # a dict when serialised
    if posterior is None:
        posterior = load_posterior(model_dir, device=device, kernels=kernels)
    frames = (a for _, a in iter_unlabelled(engine, campaign, settings_hash=settings_hash,
                                            chunk_size=acquisition.chunk_size,
                                            first_id=shard.first_id, last_id=shard.last_id))

    def on_scores(first: int, chunk, scores) -> None:
        values = scores.as_dict()
        record_scores(engine, round_id, acquisition.function.value, [
            ScoreRow(a.info["structure_id"], float(values["score"][j]),
                     {c: float(v[j]) for c, v in values.items() if c != "score"})
            for j, a in enumerate(chunk)])
        if on_chunk is not None:
            on_chunk(first + len(chunk) - shard.first_index)

    best, n, metric = stream_best(posterior, frames, acquisition, seed=seed,
                                  first_index=shard.first_index, on_scores=on_scores)
    ids = [c.atoms.info["structure_id"] for c in best]
    for c in best:
        c.atoms = None  # the flow needs the ids, not the structures
    return ShardResult(best, ids, n, metric)


def stored_selection(engine: Engine, round_id: int) -> tuple[list[int], dict[str, float]]:
    """A resumed round's stored selection and its score summary."""
    return (selected_structure_ids(engine, round_id),
            {**score_summary(engine, round_id), "selection_reused": True})


def finish_selection(engine: Engine, round_id: int,
                     acquisition: AcquisitionConfig | dict[str, Any],
                     results: Sequence[ShardResult], score_s: float,
                     ) -> tuple[list[int], dict[str, float]]:
    """Merge the shards' best candidates into the round's selection (the same as scoring
    the pool in one pass) and mark it."""
    from bayesal.bayes_model.acquisition import AcquisitionConfig
    from bayesal.bayes_model.scoring import merge_selection

    acquisition = AcquisitionConfig.model_validate(acquisition)
    sid = {c.index: i for r in results
           for c, i in zip(r.candidates, r.structure_ids, strict=True)}
    merged = merge_selection((r.candidates for r in results),
                             sum(r.n_scored for r in results),
                             any(r.features_metric for r in results), acquisition)
    chosen = [ScoreRow(sid[-c.index], c.score, c.components, rank)
              for rank, c in enumerate(merged.selected)]
    mark_selected(engine, round_id, acquisition.function.value, chosen)
    return ([r.structure_id for r in chosen],
            {**score_summary(engine, round_id), M.SCORE_S: score_s})


def select_batch(engine: Engine, campaign: str, round_id: int, settings_hash: str,
                 model_dir: Path, acquisition: AcquisitionConfig | dict[str, Any], *,
                 seed: int,
                 on_chunk: Callable[[int], None] | None = None, device: str = "auto",
                 kernels: str = "e3nn") -> tuple[list[int], dict[str, float]]:
    """Score every unlabelled candidate with the round's model (on ``device``), store the
    scores chunk by chunk and mark the selected batch, in this process (the campaign flow
    fans the shards out instead). A round whose selection is stored returns it."""
    from bayesal.bayes_model.posterior import load_posterior

    t0 = time.perf_counter()
    shards = plan_scoring(engine, campaign, round_id, settings_hash, acquisition)
    if shards is None:
        return stored_selection(engine, round_id)
    posterior = load_posterior(model_dir, device=device, kernels=kernels)
    results, done = [], 0
    for shard in shards:
        results.append(score_shard(
            engine, campaign, round_id, settings_hash, model_dir, acquisition, shard,
            seed=seed, posterior=posterior,
            on_chunk=None if on_chunk is None else (lambda n, d=done: on_chunk(d + n))))
        done += shard.n
    return finish_selection(engine, round_id, acquisition, results,
                            time.perf_counter() - t0)


