"""Round tables shared by the Prefect artifacts and `bayesal run/status` (no Prefect)."""

from __future__ import annotations

from typing import Any

from bayesal.contracts import RoundMetric as M

__all__ = ["ROUND_COLUMNS", "round_rows"]

ROUND_COLUMNS = (
    ("round", "round"), ("train labels", M.N_TRAIN_LABELS), ("labels", M.N_LABELS_TOTAL),
    ("new ok", M.N_OK),
    ("failed", M.N_FAILED), ("test F MAE eV/Å", M.TEST_FORCE_MAE),
    ("test E MAE eV", M.TEST_ENERGY_MAE), ("test F NLL", M.TEST_FORCE_NLL),
    ("F miscal. area", M.TEST_FORCE_MISCAL_RECAL),
    ("val F MAE eV/Å", M.VALID_FORCE_MAE), ("selected mean score", M.SELECTED_SCORE_MEAN),
    ("selected max score", M.SELECTED_SCORE_MAX), ("train s", M.TRAIN_S),
    ("score s", M.SCORE_S), ("label s", M.LABEL_S), ("round s", M.ROUND_S),
    ("overhead s", M.OVERHEAD_S),
)


def round_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One display row per completed round (the round table artifact and `bayesal status`)."""
    rows = []
    for r in history:
        m = {**r["metrics"], "round": r["round"]}
        rows.append({label: (round(m[k], 5) if isinstance(m.get(k), float) else m.get(k, ""))
                     for label, k in ROUND_COLUMNS})
    return rows
