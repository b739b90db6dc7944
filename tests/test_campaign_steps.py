"""The pieces the campaign flow is built from: the explorer, prediction subsets, and the
database helpers that make rounds resumable (draws, selection, models, stopping rules)."""

from __future__ import annotations

import ase
import ase.io
import numpy as np
import pytest
import torch
from helpers import TINY, rattled_waters

from bayesal.bayes_model.ensemble import prepare_data
from bayesal.bayes_model.explore import explore
from bayesal.bayes_model.model import ModelConfig
from bayesal.bayes_model.posterior import EnsemblePosterior
from bayesal.bayes_model.train import build_model


@pytest.fixture(scope="module")
def committee(shared_data):
    """Two different untrained members: a committee with real disagreement."""
    ethanol = ase.io.read(shared_data / "ethanol" / "train.xyz", ":20")
    cfg = ModelConfig(**TINY)
    data = prepare_data(ethanol[:16], ethanol[16:], cfg)
    models = [build_model(cfg, data.species, data.shifts, data.train, seed=s).double().eval()
              for s in (1, 2)]
    torch.manual_seed(2)
    with torch.no_grad():  # untrained heads start at zero: make the members disagree
        for m in models:
            m.energy_head.weight.normal_(0, 0.05)
    return EnsemblePosterior(models), ethanol


def test_max_force_std_is_the_largest_per_atom_trace_norm():
    from bayesal.bayes_model.predict import Prediction, structure_results

    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 3, 3))
    cov = a @ a.transpose(0, 2, 1)
    expected = max(np.sqrt(np.trace(c)) for c in cov)
    pred = Prediction(np.zeros(1), np.ones(1), np.ones(1), np.zeros((5, 3)), cov,
                      np.zeros((5, 3, 3)), np.array([5]))
    assert structure_results(pred)["max_force_std_epistemic"] == pytest.approx(expected)


def test_explorer_runs_full_trajectories_below_the_threshold(committee):
    posterior, ethanol = committee
    trajs = explore(posterior, ethanol[:2], temperatures_K=[300.0, 600.0], steps=12,
                    record_every=4, max_force_std_threshold=1e6, seed=3)
    assert [(t.seed_index, t.temperature_K) for t in trajs] == [
        (0, 300.0), (0, 600.0), (1, 300.0), (1, 600.0)]
    for t in trajs:
        assert t.stopped == "steps" and t.steps_run == 12
        assert [f.info["md_step"] for f in t.frames] == [4, 8, 12]
        start = ethanol[t.seed_index].positions
        assert all(np.abs(f.positions - start).max() > 1e-4 for f in t.frames)
        assert all(f.info["max_force_std"] > 0 for f in t.frames)
        # the centre of mass stays where it was
        com = np.average(start, axis=0, weights=ethanol[0].get_masses())
        for f in t.frames:
            assert np.allclose(np.average(f.positions, axis=0,
                                          weights=ethanol[0].get_masses()), com, atol=1e-8)
    again = explore(posterior, ethanol[:2], temperatures_K=[300.0, 600.0], steps=12,
                    record_every=4, max_force_std_threshold=1e6, seed=3)
    assert all(np.array_equal(f.positions, g.positions)
               for t, u in zip(trajs, again, strict=True)
               for f, g in zip(t.frames, u.frames, strict=True))


def test_explorer_stops_where_the_committee_disagrees(committee):
    posterior, ethanol = committee
    (t,) = explore(posterior, ethanol[:1], temperatures_K=[300.0], steps=50, record_every=10,
                   max_force_std_threshold=1e-9, seed=0)
    assert t.stopped == "uncertain" and t.steps_run == 1
    assert len(t.frames) == 1 and t.frames[0].info["max_force_std"] > 1e-9


def test_replicas_step_as_ase_langevin_does_each_with_its_own_generator(committee):
    """Replicas batch the model calls of several trajectories; each must still be exactly
    the trajectory ASE's Langevin (with FixCom, as ``langevin`` sets it up) runs with the
    same generator, whatever its neighbours do, and stepping some leaves the others be."""
    from bayesal.bayes_model.explore import Replicas, langevin

    posterior, ethanol = committee
    starts, temps, seeds = [ethanol[0], ethanol[1], ethanol[0]], [300.0, 600.0, 900.0], [1, 2, 3]
    md = Replicas(posterior, starts, temps, [np.random.default_rng(s) for s in seeds])
    for _ in range(15):
        md.step()
    held = md.atoms[2].positions.copy()
    md.step([0, 1])  # replica 2 waits: its positions and its generator stay as they were
    assert np.array_equal(md.atoms[2].positions, held)
    for k, (start, temperature, seed) in enumerate(zip(starts, temps, seeds, strict=True)):
        atoms = ase.Atoms(numbers=start.numbers, positions=start.positions)
        dyn = langevin(atoms, posterior, temperature_K=temperature,
                       rng=np.random.default_rng(seed))
        dyn.run(15 if k == 2 else 16)
        assert np.allclose(md.atoms[k].positions, atoms.positions, rtol=0, atol=1e-9)
        assert np.allclose(md.atoms[k].get_momenta(), atoms.get_momenta(), rtol=0, atol=1e-9)
        assert md.results[k]["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        assert md.results[k]["max_force_std_epistemic"] == pytest.approx(
            atoms.calc.results["max_force_std_epistemic"], abs=1e-9)


def test_explorer_stops_only_the_trajectory_the_model_fails_on(committee):
    posterior, ethanol = committee

    class FailsOnWater:  # a model that cannot evaluate one of the structures
        recalibration = None

        def predict(self, images):
            if any(len(a) == 3 for a in images):
                raise ValueError("cannot evaluate a water")
            return posterior.predict(images)

    water = rattled_waters(1)[0]
    trajs = explore(FailsOnWater(), [ethanol[0], water], temperatures_K=[300.0], steps=8,
                    record_every=4, max_force_std_threshold=1e6, seed=0)
    assert [(t.stopped, t.steps_run, len(t.frames)) for t in trajs] == [
        ("steps", 8, 2), ("failed", 1, 0)]


@pytest.mark.parametrize("periodic", [False, True])
def test_explorer_stops_where_a_bond_breaks_and_leaves_that_frame_out(committee, periodic):
    """An atom pushed off its molecule: beyond the cutoff every member agrees on it, so
    max-force-std does not stop the trajectory; the bond check does, and the broken frame
    (a DFT label eV above the molecule's) is not a candidate. Periodic: the molecule in a
    box, split by its faces (its bonds are bonds to images)."""
    from bayesal.bayes_model.stability import BondReference, check_frame

    posterior, ethanol = committee
    seed = ethanol[0].copy()
    if periodic:
        seed.cell, seed.pbc = [14.0] * 3, True
        seed.positions -= seed.positions.mean(0)
        seed.wrap()
    bonds = BondReference.of(seed)
    assert (bonds.shifts is not None and bool(np.abs(bonds.shifts).sum())) == periodic
    h, c = next((int(i), int(j)) if seed.numbers[i] == 1 else (int(j), int(i))
                for i, j in bonds.pairs if 1 in seed.numbers[[i, j]])

    class PushesAHydrogenOff:
        recalibration = None

        def predict(self, images):
            pred = posterior.predict(images)
            first = np.concatenate([[0], np.cumsum(pred.n_atoms)[:-1]])
            for a, k in zip(images, first, strict=True):
                away = a.get_distance(c, h, mic=True, vector=True)
                pred.forces[k + h] += 3.0 * away / np.linalg.norm(away)
            return pred

    kept, = explore(PushesAHydrogenOff(), [seed], temperatures_K=[300.0], steps=200,
                    record_every=5, max_force_std_threshold=1e6, seed=0,
                    stop_on_break=False)
    assert kept.stopped == "steps" and check_frame(bonds, kept.frames[-1], None, None)
    (t,) = explore(PushesAHydrogenOff(), [seed], temperatures_K=[300.0], steps=200,
                   record_every=5, max_force_std_threshold=1e6, seed=0)
    assert t.stopped == "broken" and 5 <= t.steps_run < 200 and t.steps_run % 5 == 0
    assert t.frames and not any(check_frame(bonds, f, None, None) for f in t.frames)
    # the same trajectory up to the break: the kept frames are those of the unchecked run
    assert [f.info["md_step"] for f in t.frames] == [
        f.info["md_step"] for f in kept.frames if f.info["md_step"] < t.steps_run]
    assert "broken" in check_frame(bonds, next(
        f for f in kept.frames if f.info["md_step"] == t.steps_run), None, None)


def test_prediction_subset_equals_predicting_the_subset(committee):
    posterior, ethanol = committee
    images = [*ethanol[:3], *rattled_waters(2)]
    torch.manual_seed(0)
    full = posterior.predict(images)
    part = posterior.predict([images[4], images[1]])
    sub = full.subset([4, 1])
    for field in ("energy", "energy_var_epi", "energy_var_ale", "forces", "forces_cov_epi",
                  "forces_cov_ale", "n_atoms"):
        assert np.allclose(getattr(sub, field), getattr(part, field), atol=1e-10), field


# ------------------------------------------------------------------ database helpers
def _campaign(engine, name, images):
    from bayesal.db.importer import import_atoms

    return import_atoms(engine, images, name).structure_ids


def test_initial_draw_is_reproducible_whatever_the_insertion_order(engine):
    from sqlalchemy import select

    from bayesal.db.models import Structure
    from bayesal.db.pool import draw_structures

    images = rattled_waters(30, seed=5)
    _campaign(engine, "a", images)
    _campaign(engine, "b", images[::-1])

    def drawn(name):
        ids = draw_structures(engine, name, 6, seed=11)
        with engine.connect() as conn:
            return set(conn.scalars(select(Structure.hash).where(Structure.id.in_(ids))))

    assert drawn("a") == drawn("b") and len(drawn("a")) == 6
    assert drawn("a") != set()
    from bayesal.db import DatabaseError

    with pytest.raises(DatabaseError, match="cannot draw 31 structures from the 30"):
        draw_structures(engine, "a", 31, seed=0)


def test_selection_models_and_summary_are_recorded_once(engine):
    from bayesal.db.rounds import (
        ModelRow,
        ScoreRow,
        mark_selected,
        open_round,
        record_models,
        record_scores,
        round_models,
        score_summary,
        selected_structure_ids,
    )

    ids = _campaign(engine, "sel", rattled_waters(6, seed=1))
    r = open_round(engine, "sel")
    record_scores(engine, r.id, "bald-ef", [ScoreRow(i, float(k), {"bald_e": 0.5 * k})
                                            for k, i in enumerate(ids)])
    chosen = [ScoreRow(ids[5], 5.0, {"bald_e": 2.5}), ScoreRow(ids[3], 3.0, {"bald_e": 1.5})]
    mark_selected(engine, r.id, "bald-ef", chosen)
    mark_selected(engine, r.id, "bald-ef", chosen)  # a restart marks the same again
    assert selected_structure_ids(engine, r.id) == [ids[5], ids[3]]
    summary = score_summary(engine, r.id)
    assert summary == {"n_scored": 6, "pool_score_max": 5.0, "pool_score_mean": 2.5,
                       "n_selected": 2, "selected_score_max": 5.0,
                       "selected_score_mean": 4.0, "selected_bald_e_mean": 2.0}
    rows = [ModelRow(k, f"/m/member_{k}.pt", "ab" * 32, {"n_train": 5}) for k in range(2)]
    record_models(engine, r.id, "ensemble", rows)
    record_models(engine, r.id, "ensemble", rows)
    assert round_models(engine, r.id) == rows


def test_stopping_rules(engine):
    from bayesal.db.ingest import LabelRecord, run_transaction, upsert_labels
    from bayesal.tasks.policy import stop_reason

    ids = _campaign(engine, "stop", rattled_waters(5, seed=2))
    run_transaction(engine, lambda s: upsert_labels(s, [
        (i, LabelRecord("pyscf", "h", "ok" if k else "scf_failed", energy=-1.0 if k else None,
                        forces=np.zeros((3, 3)) if k else None))
        for k, i in enumerate(ids[:4])]))

    def reason(history, **rules):
        base = {"max_rounds": 5, "label_budget": None, "target_force_mae": None,
                "min_score": None}
        return stop_reason(engine, "stop", "h", history, **{**base, **rules})

    done = {"status": "completed", "metrics": {"test_force_mae": 0.05, "n_selected": 3,
                                               "pool_score_max": 0.2}}
    assert reason([]) is None
    assert reason([done] * 5).startswith("max_rounds")
    assert reason([done, {"status": "running", "metrics": {}}], max_rounds=1) is None
    assert reason([done], label_budget=4).startswith("label_budget: 4 labels")  # failed count
    assert reason([done], label_budget=5) is None
    assert reason([done], target_force_mae=0.05).startswith("target_force_mae")
    assert reason([done], target_force_mae=0.04) is None
    assert reason([done], min_score=0.3).startswith("min_score")
    empty = {"status": "completed", "metrics": {"test_force_mae": 0.05, "n_selected": 0}}
    assert reason([empty]).startswith("no candidates left")


def test_round_rules_and_the_new_campaign_guard(engine):
    """A round asks for the acquisition batch clipped to the labels the budget leaves; the
    target and the minimum score gate labelling the same way they stop the campaign; a
    campaign with data continues only with resume."""
    from bayesal.db.ingest import LabelRecord, run_transaction, upsert_labels
    from bayesal.tasks import policy

    assert policy.round_n_select(10, None) == 10
    assert policy.round_n_select(10, 4) == 4 and policy.round_n_select(10, -2) == 0
    assert policy.target_reached(0.05, 0.05) and not policy.target_reached(0.06, 0.05)
    assert not policy.target_reached(0.01, None) and not policy.target_reached(None, 0.05)
    assert policy.scores_too_low(0.1, 0.2) and not policy.scores_too_low(0.2, 0.2)
    assert policy.round_force_mae({"valid_force_mae": 0.2}) == 0.2
    assert policy.round_force_mae({"valid_force_mae": 0.2, "test_force_mae": 0.1}) == 0.1

    policy.check_new_campaign(engine, "fresh", resume=False)  # nothing there yet
    ids = _campaign(engine, "busy", rattled_waters(3, seed=5))
    run_transaction(engine, lambda s: upsert_labels(s, [
        (ids[0], LabelRecord("pyscf", "h", "ok", energy=-1.0, forces=np.zeros((3, 3))))]))
    assert policy.labels_left(engine, "busy", "h", 5) == 4
    assert policy.labels_left(engine, "busy", "h", None) is None
    with pytest.raises(policy.CampaignError, match=r"'busy' already has 0 round\(s\) and 1 "
                       r"label\(s\).*--resume"):
        policy.check_new_campaign(engine, "busy", resume=False)
    policy.check_new_campaign(engine, "busy", resume=True)


def test_warm_start_source_falls_back_to_scratch_with_the_reason(committee, tmp_path):
    """A round warm-starts only from a previous model with the same config and species; a
    missing model or a new element in the labelled data means training from scratch."""
    from bayesal.bayes_model.checkpoint import save_members
    from bayesal.tasks.steps import _warm_start_source

    posterior, ethanol = committee
    prev = save_members(tmp_path / "prev", posterior.models)
    config = posterior.models[0].config
    assert _warm_start_source(None, config, ethanol) == (None, "")
    assert _warm_start_source(prev, config, ethanol) == (prev, "")
    none, why = _warm_start_source(tmp_path / "gone", config, ethanol)
    assert none is None and "no manifest.json" in why
    with_n = [*ethanol, ase.Atoms("NH3", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])]
    none, why = _warm_start_source(prev, config, with_n)
    assert none is None and "species [1, 6, 8], the data has [1, 6, 7, 8]" in why
    other = config.model_copy(update={"channels": config.channels + 1})
    assert _warm_start_source(prev, other, ethanol)[1].endswith("its model config differs")


def test_stable_validation_split_never_moves_training_structures_into_validation():
    """As a campaign's labelled set grows, every structure keeps its side of the split (so a
    fine-tuned model is validated on unseen structures); the share is about the fraction and
    both sides are non-empty even for two structures."""
    from bayesal.bayes_model.ensemble import split_validation_stable

    images = [ase.Atoms("H", info={"id": k}) for k in range(2000)]
    side: dict[int, bool] = {}
    for n in (2, 20, 200, 2000):  # a growing labelled set, ids in order
        train, valid = split_validation_stable(images[:n], list(range(n)), 0.1, seed=3)
        assert len(train) + len(valid) == n and train and valid
        now = {a.info["id"]: True for a in valid} | {a.info["id"]: False for a in train}
        if n > 2:  # no training structure ever becomes validation (2: sides may be forced)
            assert not any(now[k] for k, v in side.items() if not v)
        side = now
    assert 150 < sum(side.values()) < 250  # ~10 % of 2000
    # content-hash keys: the same structures split alike in any order (any campaign/database)
    keys = [f"{k:064x}" for k in range(200)]
    valid = split_validation_stable(images[:200], keys, 0.1, seed=3)[1]
    valid_reversed = split_validation_stable(images[:200][::-1], keys[::-1], 0.1, seed=3)[1]
    assert {a.info["id"] for a in valid} == {a.info["id"] for a in valid_reversed}
    other = split_validation_stable(images, list(range(2000)), 0.1, seed=4)[1]
    assert {a.info["id"] for a in other} != {k for k, v in side.items() if v}
    with pytest.raises(ValueError, match="2000 structures but 3 keys"):
        split_validation_stable(images, [1, 2, 3], 0.1)


@pytest.mark.parametrize("acq", ["bald-ef", "random"])
def test_scoring_in_shards_selects_and_stores_what_one_pass_does(engine, committee, tmp_path,
                                                                  acq):
    """What the campaign flow fans out over workers: the candidates cut into shards (id
    runs), each scored on its own, the best merged. The same scores are stored and the same
    structures selected, in the same order, as scoring the whole pool in one shard; shards
    in any order; a rerun reuses the stored selection."""
    from sqlalchemy import select

    from bayesal.bayes_model.acquisition import AcquisitionConfig
    from bayesal.bayes_model.checkpoint import save_members
    from bayesal.db.models import Score
    from bayesal.db.rounds import open_round
    from bayesal.tasks import steps

    posterior, ethanol = committee
    model_dir = save_members(tmp_path / "model", posterior.models)
    rng = np.random.default_rng(3)
    pool = []
    for k in range(23):
        a = ethanol[k % len(ethanol)].copy()
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        pool.append(a)
    picked, stored = {}, {}
    for name, shard_size in (("one", 1000), ("shards", 5)):
        ids = _campaign(engine, name, pool)
        round_id = open_round(engine, name).id
        config = AcquisitionConfig(function=acq, n_select=4, selection="diverse",
                                   chunk_size=3, shard_size=shard_size)
        shards = steps.plan_scoring(engine, name, round_id, "h", config)
        assert [s.n for s in shards] == ([23] if shard_size == 1000 else [5, 5, 5, 5, 3])
        assert [s.first_index for s in shards] == list(np.cumsum([0] + [s.n for s in shards])[:-1])
        results = [steps.score_shard(engine, name, round_id, "h", model_dir, config, s, seed=7,
                                     device="cpu") for s in reversed(shards)]
        assert all(c.atoms is None for r in results for c in r.candidates)
        chosen, stats = steps.finish_selection(engine, round_id, config, results, 1.0)
        assert stats["n_scored"] == 23 and len(chosen) == 4
        position = {sid: k for k, sid in enumerate(ids)}
        picked[name] = [position[sid] for sid in chosen]
        with engine.connect() as conn:
            rows = conn.execute(select(Score.structure_id, Score.score, Score.rank)
                                .where(Score.round_id == round_id)).all()
        stored[name] = sorted((position[s], round(v, 9), r) for s, v, r in rows)
        again, reused = steps.select_batch(engine, name, round_id, "h", model_dir, config,
                                           seed=7, device="cpu")
        assert again == chosen and reused["selection_reused"]
    assert picked["shards"] == picked["one"]
    assert stored["shards"] == stored["one"] and len(stored["one"]) == 23
