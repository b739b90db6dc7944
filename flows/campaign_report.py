"""Round tables shared by the Prefect artifacts and `bayesal run/status` (no Prefect)."""

from __future__ import annotations

from typing import Any

__all__ = ["ROUND_COLUMNS", "round_rows"]

ROUND_COLUMNS = (
    ("round", "round"), ("labels", "n_labels_total"), ("new ok", "n_ok"),
    ("failed", "n_failed"), ("test F MAE eV/Å", "test_force_mae"),
    ("test E MAE eV", "test_energy_mae"), ("test F NLL", "test_force_nll"),
    ("F miscal. area", "test_force_miscal_area_recal"),
    ("val F MAE eV/Å", "valid_force_mae"), ("selected mean score", "selected_score_mean"),
    ("selected max score", "selected_score_max"), ("train s", "train_s"),
    ("score s", "score_s"), ("label s", "label_s"), ("round s", "round_s"),
    ("overhead s", "overhead_s"),
)


def round_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One display row per completed round (the round table artifact and `bayesal status`)."""
    rows = []
    for r in history:
        m = {**r["metrics"], "round": r["round"]}
        rows.append({label: (round(m[k], 5) if isinstance(m.get(k), float) else m.get(k, ""))
                     for label, k in ROUND_COLUMNS})
    return rows
