"""The campaign's rules, in one place (plain functions, no Prefect): whether a campaign may
start, how many labels a round asks for, and when the campaign stops. The flow
(flows/campaign.py) and the command line (cli/campaign.py) both ask here."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from bayesal.contracts import RoundMetric as M
from bayesal.db.pool import campaign_activity, label_counts

__all__ = [
    "CampaignError",
    "check_new_campaign",
    "labels_left",
    "round_force_mae",
    "round_n_select",
    "scores_too_low",
    "stop_reason",
    "target_reached",
]


class CampaignError(RuntimeError):
    """A campaign cannot go on; the message says why and what to change."""


def check_new_campaign(engine: Engine, campaign: str, resume: bool) -> None:
    """A campaign that already has rounds or labels continues only with ``resume``
    (CampaignError otherwise, saying how)."""
    rounds, labels = campaign_activity(engine, campaign)
    if (rounds or labels) and not resume:
        raise CampaignError(
            f"campaign {campaign!r} already has {rounds} round(s) and {labels} label(s) in "
            "the database: continue it with `bayesal run CONFIG --resume`, or give the "
            "campaign another name")


def labels_left(engine: Engine, campaign: str, settings_hash: str,
                label_budget: int | None) -> int | None:
    """Labels (ok or failed, at the campaign's level of theory) the budget still allows;
    None without a budget."""
    if label_budget is None:
        return None
    return label_budget - sum(label_counts(engine, campaign, settings_hash).values())


def round_n_select(n_select: int, left: int | None) -> int:
    """Structures a round asks for: the acquisition's n_select, clipped to the labels left."""
    return n_select if left is None else max(0, min(n_select, left))


def target_reached(force_mae: float | None, target: float | None) -> bool:
    return target is not None and force_mae is not None and force_mae <= target


def scores_too_low(pool_score_max: float | None, min_score: float | None) -> bool:
    """The best candidate scores below ``min_score``: nothing worth labelling."""
    return min_score is not None and pool_score_max is not None and pool_score_max < min_score


def round_force_mae(metrics: dict[str, Any]) -> float | None:
    """The force MAE a round is judged by: on the test sets, else on validation."""
    return metrics.get(M.TEST_FORCE_MAE, metrics.get(M.VALID_FORCE_MAE))


def stop_reason(engine: Engine, campaign: str, settings_hash: str, history: list[dict], *,
                max_rounds: int, label_budget: int | None, target_force_mae: float | None,
                min_score: float | None) -> str | None:
    """Why the campaign should not start another round (None: go on). ``history`` is
    :func:`bayesal.db.rounds.round_history`; a running round is always finished first."""
    if any(r["status"] == "running" for r in history):
        return None
    done = [r for r in history if r["status"] == "completed"]
    if len(done) >= max_rounds:
        return f"max_rounds: {len(done)} rounds done"
    left = labels_left(engine, campaign, settings_hash, label_budget)
    if left is not None and left <= 0:
        return f"label_budget: {label_budget - left} labels of {label_budget}"
    if done:
        last = done[-1]["metrics"]
        mae = round_force_mae(last)
        if target_reached(mae, target_force_mae):
            return f"target_force_mae: {mae:.4g} eV/Å <= {target_force_mae}"
        if last.get(M.N_SELECTED) == 0:
            return "no candidates left to label" + (
                f" (threshold {last['threshold']})" if M.THRESHOLD in last else "")
        top = last.get(M.POOL_SCORE_MAX)
        if scores_too_low(top, min_score):
            return f"min_score: best candidate scored {top:.4g} < {min_score}"
    return None
