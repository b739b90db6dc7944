"""A 3-round campaign written with db/ code, with known numbers for the dashboard tests.

Campaign ``demo``: 4 initial water molecules (labelled in setup), 3 test molecules (labelled),
12 pool molecules. Round k scores the unlabelled pool, selects 2 and labels them; in round 1
one of the two fails (``scf_failed``). Metrics of round k are given below. Campaign
``fresh`` has 2 pool structures and no round.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import Engine

from bayesal.db import StructureSource
from bayesal.db.importer import import_atoms
from bayesal.db.ingest import LabelRecord, run_transaction, upsert_labels
from bayesal.db.pool import ids_by_source, set_campaign_config
from bayesal.db.rounds import ScoreRow, finish_round, mark_selected, open_round, record_scores

NAME = "demo"
SETTINGS = {"labeler": "replay", "method": "pbe", "basis": "def2-svp"}
HASH = "f" * 64
FORCE_MAE = [0.30, 0.20, 0.12]  # eV/Å, test set as a whole
FORCE_MAE_A = [0.31, 0.21, 0.13]  # test file "water_a"
ENERGY_MAE = [0.050, 0.030, 0.020]  # eV
FORCE_NLL = [2.5, 1.5, 0.5]
MISCAL = [0.20, 0.10, 0.05]
SPEARMAN = [0.2, 0.4, 0.6]
TRAIN_LABELS = [4, 6, 7]  # round 1's second label failed
RELIABILITY = {k: [min(1.0, p / 100 + 0.1 * (2 - k)) for p in range(10, 100, 10)]
               for k in range(3)}  # observed P(u <= p), round 2 calibrated-ish
WALL = 1.5  # seconds per round label
SCF = 12


def waters(n: int, seed: int):
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = molecule("H2O")
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        a.calc = SinglePointCalculator(a, energy=-2000.0 - 0.01 * i,
                                       forces=rng.normal(scale=0.5, size=(3, 3)))
        out.append(a)
    return out


def _record(energy: float | None, status: str = "ok", error: str | None = None,
            wall_s: float = WALL) -> LabelRecord:
    forces = None if energy is None else np.full((3, 3), 0.1)
    return LabelRecord(labeler="replay", settings_hash=HASH, status=status, energy=energy,
                       forces=forces, method="pbe", basis="def2-svp", settings=SETTINGS,
                       n_scf_cycles=SCF if status == "ok" else 50, wall_s=wall_s, error=error)


def _store(engine: Engine, items, round_id=None) -> None:
    run_transaction(engine, lambda s: upsert_labels(s, items, round_id=round_id))


def build_demo(engine: Engine) -> dict:
    """Write ``demo`` and ``fresh``; returns the structure ids by role."""
    import_atoms(engine, waters(4, 1), NAME, source=StructureSource.INITIAL)
    import_atoms(engine, waters(3, 2), NAME, source=StructureSource.TEST)
    import_atoms(engine, waters(12, 3), NAME, source=StructureSource.POOL)
    import_atoms(engine, waters(2, 4), "fresh", source=StructureSource.POOL)
    set_campaign_config(engine, NAME, {"name": NAME, "stop": {"label_budget": 10}})
    initial = ids_by_source(engine, NAME, StructureSource.INITIAL)
    test = ids_by_source(engine, NAME, StructureSource.TEST)
    pool = ids_by_source(engine, NAME, StructureSource.POOL)
    _store(engine, [(sid, _record(-2000.0)) for sid in initial + test])
    labelled: list[int] = []
    selected: dict[int, list[int]] = {}
    for k in range(3):
        info = open_round(engine, NAME)
        candidates = [sid for sid in pool if sid not in labelled]
        rows = [ScoreRow(sid, score=0.1 * (i + 1) + k,
                         components={"bald_e": 0.01 * (i + 1), "bald_f": 0.1 * (i + 1) + k,
                                     "energy_std": 0.02, "max_force_std": 0.05 * (i + 1)})
                for i, sid in enumerate(candidates)]
        record_scores(engine, info.id, "bald-ef", rows)
        best = sorted(rows, key=lambda r: -r.score)[:2]
        mark_selected(engine, info.id, "bald-ef", best)
        selected[k] = [r.structure_id for r in best]
        items = [(selected[k][0], _record(-2001.0))]
        if k == 1:
            items.append((selected[k][1], _record(None, "scf_failed", "SCF not converged",
                                                  wall_s=3.0)))
        else:
            items.append((selected[k][1], _record(-2001.5)))
        _store(engine, items, round_id=info.id)
        labelled += selected[k]
        metrics = {"n_train_labels": TRAIN_LABELS[k], "n_ok": 1 if k == 1 else 2,
                   "n_failed": 1 if k == 1 else 0,
                   "test_force_mae": FORCE_MAE[k], "test_energy_mae": ENERGY_MAE[k],
                   "test_force_nll": FORCE_NLL[k], "test_energy_nll": 3.0,
                   "test_force_miscal_area": MISCAL[k],
                   "test_force_miscal_area_recal": MISCAL[k] / 2,
                   "test_force_spearman": SPEARMAN[k], "test_energy_spearman": 0.1,
                   "test_water_a_force_mae": FORCE_MAE_A[k],
                   "test_water_a_energy_mae": ENERGY_MAE[k],
                   "selected_score_mean": float(np.mean([r.score for r in best])),
                   "train_s": 10.0, "score_s": 1.0, "label_s": 3.0, "round_s": 14.5,
                   "flow_run_id": f"00000000-0000-0000-0000-00000000000{k}",
                   **{f"test_force_reliability_p{p:02d}": v
                      for p, v in zip(range(10, 100, 10), RELIABILITY[k], strict=True)}}
        finish_round(engine, info.id, metrics=metrics, n_labelled=metrics["n_ok"])
    return {"initial": initial, "test": test, "pool": pool, "selected": selected}
