"""What the dashboard shows, as frames (no Streamlit here, no Prefect, no SQL).

The queries live in :mod:`bayesal.db.browse` (re-exported here for the app); this module
turns their rows and the rounds' metrics into frames in display units: meV and meV/Å for
errors, seconds for durations.

Everything the app reads is bounded by what it shows, not by the campaign's size: counts and
per-round statistics are SQL aggregates, plots get at most :data:`PLOT_POINTS` rows (the
newest labels; an evenly spread sample of a round's candidates), tables are pages of
:data:`PAGE_ROWS`. :class:`CampaignView` caches results between reruns until the campaign's
version (:func:`db.browse.campaign_version`: newest label/score/structure, rounds) changes,
so an idle refresh costs a few index lookups.
"""

from __future__ import annotations

import csv
import io
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from bayesal.contracts import (
    LabelStatus,
    metric_on_test,
    split_metric_on_test,
    strip_control,
)
from bayesal.contracts import RoundMetric as M
from bayesal.db.browse import (
    LABEL_COLUMNS,
    LabelFilters,
    Overview,
    ScoreOverview,
    UnknownCampaign,
    campaign_names,
    campaign_version,
    check_campaign,
    label_count,
    label_filters,
    label_rows,
    label_timeline,
    overview,
    score_overview,
    score_rows,
    score_sample,
    scored_rounds,
    structure_detail,
)
from bayesal.db.models import RoundStatus
from bayesal.db.rounds import round_history

__all__ = [
    "CSV_ROWS",
    "CURVE_METRICS",
    "PAGE_ROWS",
    "PLOT_POINTS",
    "CampaignView",
    "LabelFilters",
    "Overview",
    "ScoreOverview",
    "UnknownCampaign",
    "calibration_frame",
    "campaign_names",
    "label_count",
    "label_filters",
    "labeling_by_round",
    "labels_csv",
    "labels_frame",
    "labels_timeline",
    "learning_curves",
    "md",
    "overview",
    "prefect_run_url",
    "reliability_frame",
    "rounds_frame",
    "score_overview",
    "score_sample_frame",
    "scored_rounds",
    "scores_frame",
    "structure_detail",
    "structure_xyz",
]

# metric suffix -> (display name, factor to display units)
CURVE_METRICS = {
    "force_mae": ("force MAE (meV/Å)", 1000.0),
    "energy_mae": ("energy MAE (meV)", 1000.0),
    "force_rmse": ("force RMSE (meV/Å)", 1000.0),
    "force_nll": ("force NLL (nats)", 1.0),
    "energy_nll": ("energy NLL (nats)", 1.0),
}
PLOT_POINTS = 20_000  # rows behind one plot at most
PAGE_ROWS = 500  # rows of one page of the Data tab
CSV_ROWS = 100_000  # rows of the Data tab's CSV download at most (bayesal sql for more)
_CACHE_ENTRIES = 128

_REL_KEY = re.compile(r"^test_(?P<q>energy|force)_reliability_p(?P<p>\d\d)(?P<recal>_recal)?$")


def _history(engine: Engine, campaign: str) -> list[dict[str, Any]]:
    """:func:`db.rounds.round_history`, with an unknown campaign named as such."""
    rows = round_history(engine, campaign)
    if not rows:
        check_campaign(engine, campaign)  # raises if unknown
    return rows


def _milli(value: Any) -> float:
    return 1000.0 * value if isinstance(value, int | float) else np.nan


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else np.nan


def rounds_frame(engine: Engine, campaign: str) -> pd.DataFrame:
    """One row per round: labels, failures, test errors, calibration, batch scores, times."""
    rows = []
    for r in _history(engine, campaign):
        m = r["metrics"]
        rows.append({
            "round": r["round"], "status": r["status"],
            "training labels": m.get(M.N_TRAIN_LABELS),
            "new ok labels": m.get(M.N_OK, r["n_labelled"]),
            "failed labels": m.get(M.N_FAILED),
            "test F MAE (meV/Å)": _milli(m.get(M.TEST_FORCE_MAE)),
            "test E MAE (meV)": _milli(m.get(M.TEST_ENERGY_MAE)),
            "test F NLL": _num(m.get(M.TEST_FORCE_NLL)),
            "F miscal. area": _num(m.get(M.TEST_FORCE_MISCAL)),
            "selected mean score": _num(m.get(M.SELECTED_SCORE_MEAN)),
            "selected max score": _num(m.get(M.SELECTED_SCORE_MAX)),
            "train s": _num(m.get(M.TRAIN_S)), "score s": _num(m.get(M.SCORE_S)),
            "label s": _num(m.get(M.LABEL_S)), "round s": _num(m.get(M.ROUND_S)),
            "started": r["started_at"], "finished": r["finished_at"],
        })
    return pd.DataFrame(rows)


def _test_sets(metrics: dict[str, Any]) -> list[str]:
    """``all`` plus the per-file test sets present in a round's metrics."""
    names = []
    for key in metrics:
        found, name = split_metric_on_test(key, "force_mae")
        if found:
            names.append(name or "all")
    return sorted(names, key=lambda n: (n != "all", n))


def learning_curves(engine: Engine, campaign: str) -> pd.DataFrame:
    """Long frame (round, labels, test_set, metric, value) of completed rounds; ``labels``
    is the number of labels the round's model was trained on."""
    rows = []
    for r in _history(engine, campaign):
        m = r["metrics"]
        if r["status"] != RoundStatus.COMPLETED.value or M.N_TRAIN_LABELS not in m:
            continue
        for test_set in _test_sets(m):
            for metric, (label, factor) in CURVE_METRICS.items():
                value = m.get(metric_on_test(metric, None if test_set == "all" else test_set))
                if isinstance(value, int | float):
                    rows.append({"round": r["round"], "labels": m[M.N_TRAIN_LABELS],
                                 "test_set": test_set, "metric": label,
                                 "value": factor * value})
    return pd.DataFrame(rows, columns=["round", "labels", "test_set", "metric", "value"])


def calibration_frame(engine: Engine, campaign: str) -> pd.DataFrame:
    """Per completed round: miscalibration area, Spearman ρ(|error|, σ), ENCE and coverage of
    the whole test set, before and after the validation-fitted recalibration."""
    keys = ("miscal_area", "miscal_area_recal", "spearman", "ence", "ence_recal",
            "coverage68", "coverage68_recal", "coverage95", "coverage95_recal")
    rows = []
    for r in _history(engine, campaign):
        m = r["metrics"]
        if r["status"] != RoundStatus.COMPLETED.value or M.TEST_FORCE_MAE not in m:
            continue
        row: dict[str, Any] = {"round": r["round"], "labels": m.get(M.N_TRAIN_LABELS)}
        for quantity in ("energy", "force"):
            for k in keys:
                row[f"{quantity}_{k}"] = _num(m.get(metric_on_test(f"{quantity}_{k}")))
        rows.append(row)
    return pd.DataFrame(rows)


def reliability_frame(engine: Engine, campaign: str) -> pd.DataFrame:
    """Reliability curves (expected vs observed P(u ≤ p) of the PIT values) per completed
    round, quantity (energy/force) and variant (raw/recalibrated), with (0,0) and (1,1)."""
    rows = []
    for r in _history(engine, campaign):
        points: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for key, value in r["metrics"].items():
            if (m := _REL_KEY.match(key)) is not None and isinstance(value, int | float):
                variant = "recalibrated" if m.group("recal") else "raw"
                points.setdefault((m.group("q"), variant), []).append(
                    (int(m.group("p")) / 100, float(value)))
        for (quantity, variant), pts in sorted(points.items()):
            for expected, observed in [(0.0, 0.0), *sorted(pts), (1.0, 1.0)]:
                rows.append({"round": r["round"], "quantity": quantity, "variant": variant,
                             "expected": expected, "observed": observed})
    return pd.DataFrame(rows, columns=["round", "quantity", "variant", "expected", "observed"])


def scores_frame(engine: Engine, campaign: str, round_index: int) -> pd.DataFrame:
    """Every candidate scored in one round: score, selected, rank and the components
    (bald_e, bald_f, energy_std, max_force_std, ...) as columns."""
    rows = score_rows(engine, campaign, round_index)
    base = ["structure_id", "acquisition", "score", "selected", "rank", "source"]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=base)


def score_sample_frame(engine: Engine, campaign: str, round_index: int,
                       max_rows: int = PLOT_POINTS) -> pd.DataFrame:
    """:func:`scores_frame` bounded to ``max_rows`` candidates: the selected batch and an
    evenly spread sample of the rest (:func:`db.browse.score_sample`)."""
    rows = score_sample(engine, campaign, round_index, max_rows)
    base = ["structure_id", "acquisition", "score", "selected", "rank", "source"]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=base)


def labels_frame(engine: Engine, campaign: str, **filters: Any) -> pd.DataFrame:
    """:func:`db.browse.label_rows` as a frame (``filters``: status, source, rounds,
    formula, limit, offset); ``round`` is NaN for initial/test/imported labels."""
    return pd.DataFrame(label_rows(engine, campaign, **filters), columns=LABEL_COLUMNS)


def labels_timeline(engine: Engine, campaign: str, limit: int = PLOT_POINTS) -> pd.DataFrame:
    """The newest ``limit`` labels' created, wall s, scf cycles and status (the Labeling
    tab's plot), newest first."""
    return pd.DataFrame(label_timeline(engine, campaign, limit),
                        columns=["created", "wall s", "scf cycles", "status"])


def labels_csv(engine: Engine, campaign: str, limit: int = CSV_ROWS, **filters: Any) -> bytes:
    """The newest ``limit`` labels matching ``filters`` as CSV (the Data tab's download,
    built only when asked for)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(LABEL_COLUMNS)
    writer.writerows(label_rows(engine, campaign, limit=limit, **filters))
    return out.getvalue().encode()


LABELING_COLUMNS = ["round", "labels", "ok", "failed", "failures", "mean wall s",
                    "max wall s", "mean scf cycles"]


def labeling_by_round(ov: Overview) -> pd.DataFrame:
    """Per round (``setup`` for labels no round requested): labels, ok, failed, failure
    reasons, mean/max seconds and mean SCF cycles, from the overview's label groups (one SQL
    GROUP BY, :func:`db.browse.overview`)."""
    per_round: dict[Any, list] = {}
    for g in ov.label_groups:
        per_round.setdefault(g.round, []).append(g)
    rows = []
    for r in sorted(per_round, key=lambda k: -1 if k is None else k):
        groups = per_round[r]
        n = sum(g.n for g in groups)
        failed: dict[str, int] = {}
        for g in groups:
            if g.status != LabelStatus.OK.value:
                failed[g.status] = failed.get(g.status, 0) + g.n
        wall_n, scf_n = sum(g.wall_n for g in groups), sum(g.scf_n for g in groups)
        tops = [g.wall_max for g in groups if g.wall_max is not None]
        rows.append({"round": "setup" if r is None else str(r), "labels": n,
                     "ok": n - sum(failed.values()), "failed": sum(failed.values()),
                     "failures": ", ".join(f"{k} {v}" for k, v in sorted(failed.items())),
                     "mean wall s": sum(g.wall_sum for g in groups) / wall_n if wall_n
                     else np.nan,
                     "max wall s": max(tops) if tops else np.nan,
                     "mean scf cycles": sum(g.scf_sum for g in groups) / scf_n if scf_n
                     else np.nan})
    return pd.DataFrame(rows, columns=LABELING_COLUMNS)


# What each cached read depends on (keys of db.browse.campaign_version); others: all.
DEPENDS: dict[str, tuple[str, ...]] = {
    "overview": ("labels", "structures", "rounds"),
    "rounds_frame": ("rounds",), "learning_curves": ("rounds",),
    "calibration_frame": ("rounds",), "reliability_frame": ("rounds",),
    "scored_rounds": ("scores", "rounds"), "score_overview": ("scores", "rounds"),
    "score_sample_frame": ("scores", "rounds"),
    "labels_frame": ("labels",), "labels_timeline": ("labels",), "label_count": ("labels",),
}
ALL = ("labels", "structures", "scores", "rounds")


class CampaignView:
    """One rerun's reads of a campaign, cached between reruns.

    ``view(fn, *args, **kwargs)`` returns ``fn(engine, campaign, *args, **kwargs)``; the
    result is kept (in a process-wide LRU of :data:`_CACHE_ENTRIES` results, each bounded by
    what the dashboard shows) until the parts of :func:`db.browse.campaign_version` it
    depends on (:data:`DEPENDS`) change: a new label re-reads the label views, not the
    scores. The version is read once, when the view is made. Results are shared: callers
    must not modify them.
    """

    _cache: OrderedDict[tuple, tuple[tuple, Any]] = OrderedDict()
    _lock = threading.Lock()

    def __init__(self, engine: Engine, campaign: str) -> None:
        self.engine, self.campaign = engine, campaign
        self.version = campaign_version(engine, campaign)
        self.misses = 0

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        key = (fn.__module__, fn.__qualname__, repr(args), repr(sorted(kwargs.items())))
        return self.memo(key, lambda: fn(self.engine, self.campaign, *args, **kwargs),
                         DEPENDS.get(fn.__name__, ALL))

    def memo(self, key: tuple, build: Callable[[], Any],
             depends: tuple[str, ...] = ALL) -> Any:
        """``build()``, kept like a read under ``key`` until the version parts ``depends``
        change (e.g. a figure built from cached reads: plotly figures cost more to build
        than the reads behind them)."""
        key = (str(self.engine.url), self.campaign, *key)
        version = (self.version["campaign"], *(self.version[d] for d in depends))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == version:
                self._cache.move_to_end(key)
                return hit[1]
        self.misses += 1
        value = build()
        with self._lock:
            self._cache[key] = (version, value)
            self._cache.move_to_end(key)
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return value

    @classmethod
    def clear(cls) -> None:
        with cls._lock:
            cls._cache.clear()


def structure_xyz(detail: dict[str, Any]) -> str:
    """The structure as XYZ text (for download or a molecule viewer)."""
    from ase.data import chemical_symbols

    lines = [str(detail["n_atoms"]), f"structure {detail['id']} {detail['formula']}"]
    for z, (x, y, zc) in zip(detail["numbers"], detail["positions"], strict=True):
        lines.append(f"{chemical_symbols[int(z)]:2s} {x:12.6f} {y:12.6f} {zc:12.6f}")
    return "\n".join(lines) + "\n"


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:])")


def md(text: object) -> str:
    """Text from the database (names, methods, errors) fit for Streamlit's markdown: shown
    as written, never as links, images, HTML or formatting; control characters dropped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", strip_control(str(text)))


def prefect_run_url(flow_run_id: str | None, api_url: str | None,
                    ui_url: str | None = None) -> str | None:
    """Link to a flow run in the Prefect UI when a Prefect API (or UI) URL is configured."""
    if not flow_run_id or not (ui_url or api_url):
        return None
    base = (ui_url or re.sub(r"/api/?$", "", api_url or "")).rstrip("/")
    return f"{base}/runs/flow-run/{flow_run_id}"
