"""A 3-round campaign written with db/ code, with known numbers for the dashboard tests.

Campaign ``demo``: 4 initial water molecules (labelled in setup), 3 test molecules (labelled),
12 pool molecules. Round k scores the unlabelled pool, selects 2 and labels them; in round 1
one of the two fails (``scf_failed``). Metrics of round k are given below. Campaign
``fresh`` has 2 pool structures and no round.
"""

from __future__ import annotations

import json

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


def build_big(engine: Engine, n_labels: int, n_rounds: int, scores_per_round: int,
              name: str = "big") -> None:
    """A campaign of ``n_labels`` labelled water structures (every 50th label failed; 1 in
    200 requested by each of ``n_rounds`` completed rounds, the rest imported) whose rounds
    each scored
    ``scores_per_round`` candidates (every 50,000th selected), generated set-based inside
    the database (INSERT ... SELECT over a recursive counter): a million rows in seconds, on
    SQLite and PostgreSQL alike. For the dashboard's size tests and benchmarks/store_scale."""
    from datetime import UTC, datetime

    from ase.build import molecule
    from sqlalchemy import text

    from bayesal.db import encode_array
    from bayesal.db.ingest import get_or_create_campaign

    water = molecule("H2O")
    pg = engine.dialect.name == "postgresql"
    now = datetime.now(UTC)
    if not pg:  # stored as SQLAlchemy stores it on SQLite (naive UTC text), not "+00:00"
        now = now.replace(tzinfo=None)
    cid = run_transaction(engine, lambda s: get_or_create_campaign(s, name).id)
    counter = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :n) "
    components = ("json_build_object('bald_f', s.id % 997 / 997.0, 'max_force_std', "
                  "s.id % 89 / 89.0)" if pg else
                  "json_object('bald_f', s.id % 997 / 997.0, 'max_force_std', "
                  "s.id % 89 / 89.0)")
    params = {"cid": cid, "now": now, "numbers": encode_array(water.numbers),
              "positions": encode_array(water.positions), "cell": encode_array(np.zeros((3, 3))),
              "forces": encode_array(np.full((3, 3), 0.1)), "h": HASH}
    with engine.begin() as conn:
        conn.execute(text(
            counter + "INSERT INTO structures (campaign_id, hash, numbers, positions, cell, pbc,"
            " n_atoms, formula, source, info, created_at) SELECT :cid, 'big' || i, :numbers, "
            ":positions, :cell, 'FFF', 3, 'H2O', 'pool', '{}', :now FROM n"),
            {**params, "n": n_labels})
        conn.execute(text(
            "INSERT INTO labeler_settings (settings_hash, labeler, method, basis, settings, "
            "created_at) VALUES (:h, 'replay', 'pbe', 'def2-svp', '{}', :now) "
            "ON CONFLICT DO NOTHING"), params)
        for k in range(n_rounds):
            metrics = json.dumps({"n_train_labels": (k + 1) * n_labels // n_rounds,
                                  "test_force_mae": 0.3 / (k + 1)})
            conn.execute(text(
                "INSERT INTO rounds (campaign_id, round_index, status, started_at, finished_at,"
                " n_labelled, metrics) VALUES (:cid, :k, 'completed', :now, :now, 0, "
                + ("CAST(:m AS JSONB))" if pg else ":m)")), {**params, "k": k, "m": metrics})
        first = conn.scalar(text("SELECT min(id) FROM rounds WHERE campaign_id = :cid"), params)
        conn.execute(text(
            "INSERT INTO labels (structure_id, campaign_id, settings_hash, labeler, method, "
            "basis, status, energy, forces, energy_per_atom, max_force, n_scf_cycles, wall_s, "
            "error, provenance, round_id, created_at) SELECT s.id, s.campaign_id, :h, "
            "'replay', 'pbe', 'def2-svp', "
            "CASE WHEN s.id % 50 = 0 THEN 'scf_failed' ELSE 'ok' END, "
            "CASE WHEN s.id % 50 = 0 THEN NULL ELSE -2000.0 - s.id % 100 / 100.0 END, "
            ":forces, -666.0, 0.17, 10 + s.id % 7, 1.0 + s.id % 13 / 10.0, "
            "CASE WHEN s.id % 50 = 0 THEN 'SCF not converged' END, '{}', "
            f"CASE WHEN s.id % 200 BETWEEN 1 AND {n_rounds} THEN :first + s.id % 200 - 1 END, "
            ":now "
            "FROM structures s WHERE s.campaign_id = :cid"), {**params, "first": first})
        for k in range(n_rounds):
            conn.execute(text(
                "INSERT INTO scores (round_id, structure_id, acquisition, score, components, "
                "selected, rank) SELECT :rid, s.id, 'bald-ef', s.id % 1009 / 1009.0, "
                f"{components}, s.id % 50000 = 0, "
                "CASE WHEN s.id % 50000 = 0 THEN s.id / 50000 END "
                "FROM structures s WHERE s.campaign_id = :cid ORDER BY s.id LIMIT :n"),
                {**params, "rid": first + k, "n": scores_per_round})
        if pg:
            conn.execute(text("ANALYZE"))
