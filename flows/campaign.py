"""The campaign flow: rounds of train -> evaluate -> (explore) -> score/select -> label ->
store, until a stopping rule holds.

``campaign(config)`` is the deployment entrypoint (``flows/campaign.py:campaign``) and what
``bayesal run`` calls. The database is the source of truth: running the flow again on the
same config continues where it stopped (see tasks.steps). Each round is a sub-flow run
named ``<campaign>-round-<k>``; labeling fans out over the round's task runner (threads
locally, Dask for clusters). Per round a table and a markdown artifact are published, and a
progress artifact follows the label budget.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import deployment as prefect_deployment
from prefect.runtime import flow_run as prefect_flow_run

from bayesal.bayes_model.device import resolve_device
from bayesal.contracts import STEP_SECONDS
from bayesal.contracts import RoundMetric as M
from bayesal.db import ensure_schema
from bayesal.db.pool import label_counts
from bayesal.db.rounds import finish_round, round_history
from bayesal.flows.campaign_config import (
    CampaignConfig,
    DaskCluster,
    RunnerKind,
    load_campaign_config,
)
from bayesal.flows.campaign_report import round_rows
from bayesal.flows.run_lock import end_with_parent, run_lock
from bayesal.flows.settings import load_settings
from bayesal.labelers import LabelerKind
from bayesal.tasks import policy, steps
from bayesal.tasks.campaign import (
    evaluate_task,
    explore_task,
    finish_selection_task,
    import_task,
    label_task,
    open_round_task,
    plan_scoring_task,
    score_shard_task,
    stored_selection_task,
    train_task,
    unlabelled_task,
)

__all__ = ["campaign", "campaign_round", "campaign_setup", "make_task_runner"]


class _Context:
    """What every step of a campaign needs, derived once from the config and settings."""

    def __init__(self, config_path: str | Path, *, device: str | None = None,
                 kernels: str | None = None) -> None:
        cfg = load_campaign_config(config_path)
        overrides = {k: v for k, v in (("device", device), ("kernels", kernels)) if v}
        # `bayesal run --device/--kernels`: validated like the YAML's own values
        self.cfg: CampaignConfig = (CampaignConfig.model_validate(
            {**cfg.model_dump(mode="json"), **overrides}) if overrides else cfg)
        settings = load_settings()
        self.url = settings.database_url
        self.engine = steps.engine_for(self.url)
        self.root = settings.campaign_dir(self.cfg.name)
        self.guess_dir = (str(settings.scf_guess_dir)
                          if self.cfg.labeler.kind is LabelerKind.PYSCF else None)
        self.settings_hash = self.cfg.labeler.settings_hash

    def model_dir(self, round_index: int) -> Path:
        return self.root / f"round-{round_index:03d}" / "model"

    def label_budget_left(self) -> int | None:
        return policy.labels_left(self.engine, self.cfg.name, self.settings_hash,
                                  self.cfg.stop.label_budget)


def make_task_runner(cfg: CampaignConfig):
    """The task runner labels fan out over: threads (local) or Dask (local cluster, or
    SLURM/PBS batch jobs through dask-jobqueue)."""
    if cfg.runner.kind is RunnerKind.LOCAL:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=cfg.labeler.workers)
    from prefect_dask import DaskTaskRunner

    d = cfg.runner.dask
    security: dict[str, Any] = {}
    if d.tls:
        from distributed.security import Security

        security = {"security": Security.temporary()}
    if d.cluster is DaskCluster.LOCAL:  # scheduler and dashboard on loopback only
        return DaskTaskRunner(cluster_kwargs={"n_workers": d.jobs,
                                              "threads_per_worker": d.cores,
                                              "processes": True, "host": "127.0.0.1",
                                              "dashboard_address": d.dashboard_address,
                                              **security})
    kwargs: dict[str, Any] = {"cores": d.cores, "memory": d.memory, "walltime": d.walltime,
                              "processes": 1, **security,
                              "scheduler_options": {"dashboard_address": d.dashboard_address}}
    if d.queue:
        kwargs["queue"] = d.queue
    if d.account:
        kwargs["account"] = d.account
    cluster = {DaskCluster.SLURM: "dask_jobqueue.SLURMCluster",
               DaskCluster.PBS: "dask_jobqueue.PBSCluster"}
    return DaskTaskRunner(cluster_class=cluster[d.cluster], cluster_kwargs=kwargs,
                          adapt_kwargs={"minimum": 0, "maximum": d.jobs})


def _label(ctx: _Context, ids: list[int], round_id: int | None) -> dict[str, Any]:
    """Label ``ids`` (those still unlabelled) through the task runner; returns counts."""
    t0 = time.perf_counter()
    todo = unlabelled_task(ctx.url, ids, ctx.settings_hash)
    states = []
    if todo:
        label = label_task.with_options(retries=ctx.cfg.labeler.retries,
                                        retry_delay_seconds=1)
        futures = label.map(unmapped(ctx.url), unmapped(ctx.cfg.name),
                            unmapped(ctx.cfg.labeler), unmapped(ctx.guess_dir), todo,
                            unmapped(round_id), unmapped(ctx.cfg.labeler.retries))
        futures.wait()
        states = [f.state for f in futures]
    crashed = [s for s in states if not s.is_completed()]
    if crashed:  # not label failures (those are stored): the store itself failed
        raise policy.CampaignError(f"{len(crashed)} labeling task(s) crashed, first: "
                                  f"{crashed[0].message}; run the campaign again to retry them")
    results = [s.result() for s in states]
    walls = [r["wall_s"] for r in results if r["status"] != "exists" and r["wall_s"]]
    return {"n_computed": len(results), M.LABEL_S: time.perf_counter() - t0,
            "label_mean_s": sum(walls) / len(walls) if walls else 0.0}


def _select(ctx: _Context, round_id: int, round_index: int, model_dir: Path,
            acquisition) -> tuple[list[int], dict[str, Any]]:
    """Score the candidates in shards fanned out over the task runner (as labels are), then
    merge their best into the round's selection: the same as one process scoring all."""
    t0 = time.perf_counter()
    url, name, shash, cfg = ctx.url, ctx.cfg.name, ctx.settings_hash, ctx.cfg
    shards = plan_scoring_task(url, name, round_id, round_index, shash, acquisition)
    if shards is None:
        return stored_selection_task(url, round_id)
    futures = score_shard_task.map(
        unmapped(url), unmapped(name), unmapped(round_id), unmapped(round_index),
        unmapped(shash), unmapped(model_dir), unmapped(acquisition), shards,
        seed=unmapped(cfg.seed + round_index), device=unmapped(cfg.device),
        kernels=unmapped(cfg.kernels))
    futures.wait()
    failed = [f.state for f in futures if not f.state.is_completed()]
    if failed:
        raise policy.CampaignError(f"{len(failed)} of {len(shards)} scoring task(s) failed, "
                                  f"first: {failed[0].message}; run the campaign again (the "
                                  "scores stored are kept)")
    return finish_selection_task(url, round_id, round_index, acquisition,
                                 [f.result() for f in futures], time.perf_counter() - t0)


@flow(name="campaign-setup", log_prints=True)
def campaign_setup(config: str) -> steps.Sources:
    """Import the campaign's files and label its initial and test structures."""
    ctx = _Context(config)
    cfg = ctx.cfg
    sources = import_task(ctx.url, cfg.name, cfg.model_dump(mode="json"),
                          pool_files=cfg.data.pool_files, initial_files=cfg.data.initial_files,
                          test_files=cfg.data.test_files,
                          initial_random=cfg.data.initial_random, seed=cfg.seed)
    test_ids = [i for ids in sources.test.values() for i in ids]
    stats = _label(ctx, sources.initial + test_ids, None)
    get_run_logger().info("initial and test labels: %d computed", stats["n_computed"])
    return sources


@flow(name="campaign-round", log_prints=True)
def campaign_round(config: str, round_id: int, round_index: int,
                   test_sets: dict[str, list[int]], device: str | None = None,
                   kernels: str | None = None) -> dict[str, Any]:
    """One round: train -> evaluate -> (explore) -> score/select -> label -> store
    (``device``/``kernels``: instead of the config's)."""
    t_round = time.perf_counter()
    ctx = _Context(config, device=device, kernels=kernels)
    cfg, name, url, shash = ctx.cfg, ctx.cfg.name, ctx.url, ctx.settings_hash
    model_dir = ctx.model_dir(round_index)
    logger = get_run_logger()
    metrics: dict[str, Any] = {"acquisition": cfg.acquisition.function.value,
                               "selection": cfg.acquisition.selection.value,
                               "method": cfg.method.value,
                               "flow_run_id": str(prefect_flow_run.id)}  # dashboard link
    metrics.update(train_task(url, name, round_id, round_index, shash, model_dir,
                              method=cfg.method.value, members=cfg.members,
                              settings=cfg_training(cfg),
                              valid_fraction=cfg.data.valid_fraction, seed=cfg.seed,
                              max_minutes=cfg.max_train_minutes,
                              **_finetune(ctx, round_index)))
    metrics.update(evaluate_task(url, name, round_index, shash, model_dir, test_sets,
                                 device=cfg.device, kernels=cfg.kernels))
    n_select = policy.round_n_select(cfg.acquisition.n_select, ctx.label_budget_left())
    if not policy.target_reached(policy.round_force_mae(metrics),
                                 cfg.stop.target_force_mae) and n_select > 0:
        if cfg.explorer is not None:
            e = cfg.explorer
            metrics.update(explore_task(url, name, round_index, shash, model_dir,
                                        temperatures_K=e.temperatures_K, steps=e.steps,
                                        timestep_fs=e.timestep_fs,
                                        friction_per_fs=e.friction_per_fs,
                                        max_force_std=e.max_force_std,
                                        record_every=e.record_every,
                                        stop_on_break=e.stop_on_break,
                                        seeds_per_round=e.seeds_per_round, seed=cfg.seed,
                                        device=cfg.device, kernels=cfg.kernels))
        a = cfg.acquisition
        selected, stats = _select(ctx, round_id, round_index, model_dir,
                                  a.model_copy(update={"n_select": n_select}))
        metrics.update(stats)
        metrics[M.N_SELECTED] = len(selected)
        if a.threshold is not None:
            metrics[M.THRESHOLD] = a.threshold
        if selected and not policy.scores_too_low(stats.get(M.POOL_SCORE_MAX, 0.0),
                                                  cfg.stop.min_score):
            metrics.update(_label(ctx, selected, round_id))
    else:
        logger.info("round %d: no labels requested (target reached or label budget spent)",
                    round_index)
    counts = label_counts(ctx.engine, name, shash, round_id=round_id)
    metrics.update(n_ok=counts.get("ok", 0),
                   n_failed=sum(v for k, v in counts.items() if k != "ok"),
                   n_labels_total=label_counts(ctx.engine, name, shash, test=False)
                   .get("ok", 0))
    metrics[M.ROUND_S] = time.perf_counter() - t_round
    inner = sum(metrics.get(k, 0.0) for k in STEP_SECONDS)
    metrics[M.OVERHEAD_S] = max(0.0, metrics[M.ROUND_S] - inner)
    finish_round(ctx.engine, round_id, metrics=metrics, n_labelled=counts.get("ok", 0))
    _round_artifacts(ctx, round_index, metrics)
    return metrics


def _finetune(ctx: _Context, round_index: int) -> dict[str, Any]:
    """Warm start from the newest completed round's model when the config asks for it (a
    failed round's under-trained model is not continued)."""
    ft = ctx.cfg.finetune
    done = [r["round"] for r in round_history(ctx.engine, ctx.cfg.name)
            if r["status"] == "completed" and r["round"] < round_index]
    if ft is None or not done:
        return {}
    return {"init_from": ctx.model_dir(done[-1]), "finetune": ft.apply(ctx.cfg.train)}


def cfg_training(cfg: CampaignConfig):
    """The model/train/posterior sections as the TrainingFile that bayes_model expects."""
    from bayesal.bayes_model.config import TrainingFile

    return TrainingFile(device=cfg.device, kernels=cfg.kernels, model=cfg.model,
                        train=cfg.train, posterior=cfg.posterior)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "campaign"


def _round_artifacts(ctx: _Context, round_index: int, metrics: dict[str, Any]) -> None:
    slug = _slug(ctx.cfg.name)
    history = [r for r in round_history(ctx.engine, ctx.cfg.name)
               if r["status"] == "completed"]
    create_table_artifact(round_rows(history), key=f"{slug}-rounds",
                          description=f"Rounds of campaign {ctx.cfg.name}")
    lines = [f"# {ctx.cfg.name}, round {round_index}", "",
             f"* labels: {metrics['n_ok']} new ok, {metrics['n_failed']} failed "
             f"({metrics['n_labels_total']} training labels in all)",
             f"* validation force MAE: {metrics['valid_force_mae']:.4f} eV/Å"]
    if M.TEST_FORCE_MAE in metrics:
        lines.append(f"* test force MAE {metrics['test_force_mae']:.4f} eV/Å, energy MAE "
                     f"{metrics['test_energy_mae']:.4f} eV, force NLL "
                     f"{metrics['test_force_nll']:.3f}")
    if M.SELECTED_SCORE_MEAN in metrics:
        lines.append(f"* selected {metrics['n_selected']} of {metrics['n_scored']} "
                     f"candidates by {metrics['acquisition']} ({metrics['selection']}): "
                     f"mean score {metrics['selected_score_mean']:.4g}, max "
                     f"{metrics['selected_score_max']:.4g}")
    lines.append("* time: " + ", ".join(f"{k[:-2]} {metrics[k]:.1f} s" for k in
                                         (M.TRAIN_S, M.EVALUATE_S, M.EXPLORE_S, M.SCORE_S,
                                          M.LABEL_S, M.OVERHEAD_S, M.ROUND_S)
                                         if k in metrics))
    create_markdown_artifact("\n".join(lines), key=f"{slug}-round-{round_index}",
                             description=f"Round {round_index} of {ctx.cfg.name}")


def _run_name() -> str:
    from prefect.runtime import flow_run

    try:
        import yaml

        return str(yaml.safe_load(Path(flow_run.parameters["config"]).read_text())["name"])
    except Exception:
        return "campaign"


@flow(name="campaign", flow_run_name=_run_name, log_prints=True)
def campaign(config: str, resume: bool = True, device: str | None = None,
             kernels: str | None = None) -> dict[str, Any]:
    """Run (or continue) the active-learning campaign described by the YAML ``config``;
    ``device``/``kernels`` replace the config's (``bayesal run --device``)."""
    if prefect_deployment.id is not None:  # a worker's child: not to outlive the worker
        end_with_parent()
    ctx = _Context(config, device=device, kernels=kernels)
    with run_lock(ctx.root, ctx.cfg.name):  # released by the kernel however we end
        return _campaign(ctx, config, resume, device, kernels)


def _campaign(ctx: _Context, config: str, resume: bool, device: str | None = None,
              kernels: str | None = None) -> dict[str, Any]:
    cfg, logger = ctx.cfg, get_run_logger()
    resolve_device(cfg.device, what="device")  # a worker without the GPU: before any work
    ensure_schema(ctx.engine, create=True)
    policy.check_new_campaign(ctx.engine, cfg.name, resume)
    sources = campaign_setup.with_options(flow_run_name=f"{cfg.name}-setup",
                                          task_runner=make_task_runner(cfg))(str(config))
    slug = _slug(cfg.name)
    progress_id = None
    while True:
        history = round_history(ctx.engine, cfg.name)
        reason = policy.stop_reason(ctx.engine, cfg.name, ctx.settings_hash, history,
                                   max_rounds=cfg.stop.max_rounds,
                                   label_budget=cfg.stop.label_budget,
                                   target_force_mae=cfg.stop.target_force_mae,
                                   min_score=cfg.stop.min_score)
        progress = _progress(ctx, history)
        if progress_id is None:
            progress_id = create_progress_artifact(progress, key=f"{slug}-progress",
                                                   description=_progress_text(ctx))
        else:
            update_progress_artifact(progress_id, progress)
        if reason:
            break
        info = open_round_task(ctx.url, cfg.name)
        round_flow = campaign_round.with_options(
            flow_run_name=f"{cfg.name}-round-{info.index}", task_runner=make_task_runner(cfg))
        round_flow(str(config), info.id, info.index, sources.test, device, kernels)
    history = [r for r in round_history(ctx.engine, cfg.name) if r["status"] == "completed"]
    counts = label_counts(ctx.engine, cfg.name, ctx.settings_hash, test=None)
    logger.info("campaign %s stopped: %s (%d rounds, labels %s)", cfg.name, reason,
                len(history), counts)
    last = history[-1]["metrics"] if history else {}
    return {"campaign": cfg.name, "rounds": len(history), "stop_reason": reason,
            "labels": counts, M.TEST_FORCE_MAE: last.get(M.TEST_FORCE_MAE),
            M.VALID_FORCE_MAE: last.get(M.VALID_FORCE_MAE)}


def _progress(ctx: _Context, history: list[dict[str, Any]]) -> float:
    """Percent of the label budget used (or of the rounds, without a budget)."""
    budget = ctx.cfg.stop.label_budget
    if budget is not None:
        return min(100.0, 100.0 * (budget - ctx.label_budget_left()) / budget)
    done = sum(r["status"] == "completed" for r in history)
    return min(100.0, 100.0 * done / ctx.cfg.stop.max_rounds)


def _progress_text(ctx: _Context) -> str:
    if ctx.cfg.stop.label_budget is not None:
        return f"Labels used of the budget of {ctx.cfg.stop.label_budget} ({ctx.cfg.name})"
    return f"Rounds done of {ctx.cfg.stop.max_rounds} ({ctx.cfg.name})"
