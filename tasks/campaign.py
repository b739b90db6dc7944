"""Prefect tasks of a campaign: thin wrappers over tasks.steps, tasks.labeling and db.

Arguments are plain values (database URL, ids, paths, dicts) so that tasks can run in
threads, processes or on Dask workers; each opens its own engine. Results are not cached
by Prefect: the database decides what is already done.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.runtime import task_run

from bayesal.contracts import RoundMetric as M
from bayesal.db.pool import load_atoms, unlabelled_ids
from bayesal.db.rounds import RoundInfo, open_round
from bayesal.tasks import steps
from bayesal.tasks.labeling import build_labeler, compute_label, store_results

if TYPE_CHECKING:
    from bayesal.bayes_model.acquisition import AcquisitionConfig
    from bayesal.labelers import LabelerConfig

__all__ = ["evaluate_task", "explore_task", "finish_selection_task", "import_task",
           "label_task", "open_round_task", "plan_scoring_task", "score_shard_task",
           "stored_selection_task", "train_task", "unlabelled_task"]


class RetryableLabelError(RuntimeError):
    """A labeling worker died (not an SCF failure): worth another try."""


@task(name="import-sources", cache_policy=NONE)
def import_task(url: str, campaign: str, config: dict[str, Any], *, pool_files: list[Path],
                initial_files: list[Path], test_files: list[Path],
                initial_random: int | None, seed: int) -> steps.Sources:
    sources = steps.import_sources(steps.engine_for(url), campaign, config,
                                   pool_files=pool_files, initial_files=initial_files,
                                   test_files=test_files, initial_random=initial_random,
                                   seed=seed)
    get_run_logger().info("campaign %s: %d pool structures, %d initial, %d test", campaign,
                          sources.n_pool, len(sources.initial),
                          sum(len(v) for v in sources.test.values()))
    return sources


@task(name="open-round", cache_policy=NONE)
def open_round_task(url: str, campaign: str) -> RoundInfo:
    info = open_round(steps.engine_for(url), campaign)
    get_run_logger().info("%s round %d of %s", "resuming" if info.resumed else "starting",
                          info.index, campaign)
    return info


@task(name="unlabelled", cache_policy=NONE)
def unlabelled_task(url: str, ids: list[int], settings_hash: str) -> list[int]:
    return unlabelled_ids(steps.engine_for(url), ids, settings_hash)


@task(name="train", cache_policy=NONE, task_run_name="train-round-{round_index}")
def train_task(url: str, campaign: str, round_id: int, round_index: int, settings_hash: str,
               model_dir: Path, **kwargs) -> dict[str, Any]:
    logger = get_run_logger()
    last = [0.0]

    def on_epoch(k: int | str, record: dict) -> None:
        if time.monotonic() - last[0] > 10:  # a line every 10 s is enough
            last[0] = time.monotonic()
            logger.info("member %s epoch %d: loss %.4g, validation force MAE %.4f eV/Å", k,
                        record["epoch"], record["loss"], record[M.VALID_FORCE_MAE])

    out = steps.train_round(steps.engine_for(url), campaign, round_id, round_index,
                            settings_hash, model_dir, on_epoch=on_epoch, **kwargs)
    logger.info("model %s (%s): validation force MAE %.4f eV/Å on %d labels", model_dir,
                "reused" if out["reused"] else f"trained in {out['train_s']:.0f} s",
                out[M.VALID_FORCE_MAE], out[M.N_TRAIN_LABELS])
    return out


@task(name="evaluate", cache_policy=NONE, task_run_name="evaluate-round-{round_index}")
def evaluate_task(url: str, campaign: str, round_index: int, settings_hash: str,
                  model_dir: Path, test_sets: dict[str, list[int]], *, device: str = "auto",
                  kernels: str = "e3nn") -> dict[str, float]:
    t0 = time.perf_counter()
    metrics = steps.evaluate_model(steps.engine_for(url), campaign, settings_hash, model_dir,
                                   test_sets, device=device, kernels=kernels)
    if metrics:
        get_run_logger().info("test: force MAE %.4f eV/Å, energy MAE %.4f eV, force NLL %.3f",
                              metrics[M.TEST_FORCE_MAE], metrics[M.TEST_ENERGY_MAE],
                              metrics[M.TEST_FORCE_NLL])
    return {**metrics, M.EVALUATE_S: time.perf_counter() - t0}


@task(name="explore", cache_policy=NONE, task_run_name="explore-round-{round_index}")
def explore_task(url: str, campaign: str, round_index: int, settings_hash: str,
                 model_dir: Path, **kwargs) -> dict[str, float]:
    out = steps.explore_round(steps.engine_for(url), campaign, round_index, settings_hash,
                              model_dir, **kwargs)
    get_run_logger().info("exploration: %d new candidate frames", out[M.N_EXPLORED])
    return out


@task(name="plan-scoring", cache_policy=NONE, task_run_name="plan-scoring-round-{round_index}")
def plan_scoring_task(url: str, campaign: str, round_id: int, round_index: int,
                      settings_hash: str, acquisition: AcquisitionConfig,
                      ) -> list[steps.ScoringShard] | None:
    shards = steps.plan_scoring(steps.engine_for(url), campaign, round_id, settings_hash,
                                acquisition)
    if shards is None:
        get_run_logger().info("round %d: stored selection reused", round_index)
    else:
        get_run_logger().info("round %d: %d candidates to score in %d task(s)", round_index,
                              sum(s.n for s in shards), len(shards))
    return shards


@task(name="score", cache_policy=NONE,
      task_run_name="score-round-{round_index}-from-{shard.first_index}")
def score_shard_task(url: str, campaign: str, round_id: int, round_index: int,
                     settings_hash: str, model_dir: Path, acquisition: AcquisitionConfig,
                     shard: steps.ScoringShard, *, seed: int, device: str = "auto",
                     kernels: str = "e3nn") -> steps.ShardResult:
    logger = get_run_logger()
    last = [time.monotonic()]

    def on_chunk(n: int) -> None:
        if time.monotonic() - last[0] > 10:
            last[0] = time.monotonic()
            logger.info("scored %d of %d candidates", n, shard.n)

    with steps.SCORING_LOCK:  # (a module attribute: tasks are pickled by value)
        return steps.score_shard(steps.engine_for(url), campaign, round_id, settings_hash,
                                 model_dir, acquisition, shard, seed=seed, device=device,
                                 kernels=kernels, on_chunk=on_chunk)


@task(name="select", cache_policy=NONE, task_run_name="select-round-{round_index}")
def finish_selection_task(url: str, round_id: int, round_index: int,
                          acquisition: AcquisitionConfig, results: list[steps.ShardResult],
                          score_s: float) -> tuple[list[int], dict[str, float]]:
    ids, stats = steps.finish_selection(steps.engine_for(url), round_id, acquisition,
                                        results, score_s)
    get_run_logger().info("selected %d of %d candidates", len(ids), stats.get(M.N_SCORED, 0))
    return ids, stats


@task(name="stored-selection", cache_policy=NONE)
def stored_selection_task(url: str, round_id: int) -> tuple[list[int], dict[str, float]]:
    return steps.stored_selection(steps.engine_for(url), round_id)


@task(name="label", cache_policy=NONE, task_run_name="label-structure-{structure_id}")
def label_task(url: str, campaign: str, labeler: LabelerConfig | dict[str, Any],
               guess_dir: str | None,
               structure_id: int, round_id: int | None, retries: int = 0) -> dict[str, Any]:
    """Label one structure and store the outcome at once. A crashed worker (status
    ``error``) is retried by Prefect up to ``retries`` times, then recorded."""
    engine = steps.engine_for(url)
    labeler = build_labeler(labeler, guess_dir)
    if not unlabelled_ids(engine, [structure_id], labeler.settings_hash):
        return {"structure_id": structure_id, "status": "exists", "wall_s": 0.0}
    atoms = load_atoms(engine, [structure_id])[0]
    result = compute_label(labeler, atoms)
    if result.status == "error" and (task_run.run_count or 1) <= retries:
        raise RetryableLabelError(f"structure {structure_id}: {result.error}")
    store_results(engine, campaign, labeler, [(atoms, result)], round_id=round_id)
    if not result.ok:
        get_run_logger().warning("structure %d: %s (%s)", structure_id, result.status,
                                 (result.error or "").splitlines()[0][:200] if result.error
                                 else "no reason given")
    return {"structure_id": structure_id, "status": result.status, "wall_s": result.wall_s,
            "n_scf_cycles": result.n_scf_cycles}
