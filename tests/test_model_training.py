"""Training, checkpoints, ensembles and the ASE calculator."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
import torch
from ase import units
from ase.build import molecule
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from bayesal.bayes_model.calculator import BayesalCalculator
from bayesal.bayes_model.checkpoint import CheckpointError, load_members, save_members
from bayesal.bayes_model.ensemble import prepare_data
from bayesal.bayes_model.model import ModelConfig
from bayesal.bayes_model.posterior import EnsemblePosterior, load_posterior
from bayesal.bayes_model.predict import predict_members
from bayesal.bayes_model.train import TrainConfig, build_model, train_model

SMALL = ModelConfig(channels=8, n_layers=2, radial_hidden=16)


@pytest.fixture(scope="module")
def ethanol(shared_data):
    return ase.io.read(shared_data / "ethanol" / "train.xyz", ":240")


def small_model(data, seed=0):
    return build_model(SMALL, data.species, data.shifts, data.train, seed=seed)


@pytest.mark.slow
def test_training_beats_the_zero_force_baseline(ethanol):
    cfg = ModelConfig(channels=16, n_layers=2, radial_hidden=32)
    data = prepare_data(ethanol[:200], ethanol[200:], cfg)
    zero = np.mean(np.abs(np.concatenate([g.forces for g in data.valid])))
    model = build_model(cfg, data.species, data.shifts, data.train)
    result = train_model(model, data.train, data.valid,
                         TrainConfig(max_epochs=12, warmup_epochs=2, lr=1e-2, batch_size=8))
    ratio = result.best_metrics["force_mae"] / zero
    assert ratio < 0.35, f"validation force MAE / zero-force baseline = {ratio:.2f}"


def test_training_is_deterministic_and_resumes_exactly(ethanol, tmp_path):
    data = prepare_data(ethanol[:40], ethanol[40:48], SMALL)
    cfg = TrainConfig(max_epochs=4, warmup_epochs=1, float64=True, seed=3)

    straight = train_model(small_model(data), data.train, data.valid, cfg)
    again = train_model(small_model(data), data.train, data.valid, cfg)
    for (k, a), b in zip(straight.model.state_dict().items(), again.model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k

    first = train_model(small_model(data), data.train, data.valid,
                        cfg.model_copy(update={"max_epochs": 2}), work_dir=tmp_path)
    assert len(first.history) == 2
    resumed = train_model(small_model(data, seed=99), data.train, data.valid, cfg,
                          work_dir=tmp_path, resume=True)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    for (k, a), b in zip(straight.model.state_dict().items(),
                         resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-12), k


def test_checkpoint_round_trip_and_bad_checkpoints(ethanol, tmp_path):
    data = prepare_data(ethanol[:20], ethanol[20:24], SMALL)
    models = [small_model(data, seed=s).eval() for s in (0, 1)]
    save_members(tmp_path, models, seeds=[0, 1])
    _, manifest = load_members(tmp_path)
    assert manifest.method == "ensemble" and manifest.species == [1, 6, 8]
    a = predict_members(models, ethanol[30:33])
    b = load_posterior(tmp_path).predict(ethanol[30:33])
    for field in ("energy", "energy_var_epi", "energy_var_ale", "forces", "forces_cov_epi"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))

    blob = (tmp_path / "member_1.pt").read_bytes()
    (tmp_path / "member_1.pt").write_bytes(blob[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match=r"member_1\.pt is corrupted"):
        load_members(tmp_path)
    (tmp_path / "member_1.pt").write_bytes(blob)

    manifest_path = tmp_path / "manifest.json"
    text = manifest_path.read_text()
    changed = json.loads(text)
    changed["config"]["channels"] = 12
    manifest_path.write_text(json.dumps(changed))
    with pytest.raises(CheckpointError, match="does not match the model its manifest describes"):
        load_members(tmp_path)
    changed["format_version"] = 99
    manifest_path.write_text(json.dumps(changed))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_members(tmp_path)
    manifest_path.unlink()
    with pytest.raises(CheckpointError, match="not a bayesal model directory"):
        load_posterior(tmp_path)


def test_identical_members_have_zero_epistemic_variance(ethanol):
    data = prepare_data(ethanol[:20], ethanol[20:24], SMALL)
    model = small_model(data).eval()
    same = EnsemblePosterior([model, model, model]).predict(ethanol[30:34])
    assert np.abs(same.energy_var_epi).max() == 0
    assert np.abs(same.forces_cov_epi).max() == 0
    assert (same.energy_var_ale > 0).all()
    other = small_model(data, seed=5).eval()
    with torch.no_grad():
        other.energy_head.weight.normal_(0, 0.1)  # heads start at zero: make them differ
    different = EnsemblePosterior([model, other]).predict(ethanol[30:34])
    assert (different.energy_var_epi > 0).all() and (different.forces_cov_epi != 0).any()


def test_calculator_drives_energy_conserving_md(ethanol):
    data = prepare_data(ethanol[:20], ethanol[20:24], SMALL)
    torch.manual_seed(0)
    model = small_model(data).double().eval()
    with torch.no_grad():
        model.energy_head.weight.normal_(0, 0.3)  # a non-trivial potential energy surface
    calc = BayesalCalculator(posterior=EnsemblePosterior([model]))
    atoms = molecule("CH3CH2OH")
    atoms.calc = calc
    p = EnsemblePosterior([model]).predict([atoms])
    assert atoms.get_potential_energy() == pytest.approx(p.energy[0])
    np.testing.assert_allclose(atoms.get_forces(), p.forces)
    assert calc.results["forces_std"].shape == (9, 3) and calc.results["energy_std"] > 0
    assert calc.results["energy_std_epistemic"] == 0.0  # one member: no epistemic part

    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=0.25 * units.fs)
    e0 = atoms.get_total_energy()
    energies = []
    for _ in range(40):
        dyn.run(5)
        energies.append(atoms.get_total_energy())
    assert np.abs(atoms.get_forces()).max() > 0.05  # it moved on a real surface
    assert max(abs(e - e0) for e in energies) < 2e-3


def test_saved_ensemble_reproduces_the_validation_metrics_of_training(ethanol, tmp_path):
    """The model directory must predict exactly what the trained model predicted: the
    validation force MAE stored in the manifest is recomputed from the loaded members
    (regression: the neighbour normalisation was lost when members were rebuilt)."""
    from bayesal.bayes_model.ensemble import train_ensemble
    from bayesal.bayes_model.metrics import accuracy_metrics

    train, valid = ethanol[:40], ethanol[40:50]
    cfg = TrainConfig(max_epochs=3, warmup_epochs=1, batch_size=8, float64=True)
    out = train_ensemble(train, valid, tmp_path / "m", members=2, model_config=SMALL,
                         train_config=cfg, processes=1)
    post = load_posterior(out)
    for model, member in zip(post.models, post.manifest.members, strict=True):
        assert model.avg_neighbors == pytest.approx(
            json.loads((out / "manifest.json").read_text())["avg_neighbors"])
        assert model.avg_neighbors != 10.0  # the constructor default
        mae = accuracy_metrics(EnsemblePosterior([model]).predict(valid), valid)["force_mae"]
        assert mae == pytest.approx(member["valid_force_mae"], rel=1e-9)


def test_parallel_members_report_every_epoch_and_leave_no_process(ethanol, tmp_path):
    """Members in 2 processes: the progress callback gets every member's every epoch (through
    the queue handed to the members) and no helper process outlives the call."""
    import multiprocessing

    from bayesal.bayes_model.ensemble import train_ensemble

    seen: list[tuple[int, int]] = []
    cfg = TrainConfig(max_epochs=2, warmup_epochs=1, batch_size=8, shared_start=0)
    out = train_ensemble(ethanol[:16], ethanol[16:20], tmp_path / "m", members=2,
                         model_config=SMALL, train_config=cfg, processes=2,
                         on_epoch=lambda k, rec: seen.append((k, rec["epoch"])))
    assert sorted(seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len(load_posterior(out).models) == 2
    assert multiprocessing.active_children() == []


def test_warm_start_continues_from_the_previous_members(ethanol, tmp_path):
    """init_from: every member starts from the previous model's member (weights, energy
    shifts, force scale, neighbour normalisation kept although the new data would give others);
    a step of 1e-9 leaves its predictions unchanged, while a fresh start differs. Another
    model config or other species are refused with the reason."""
    from bayesal.bayes_model.ensemble import train_ensemble

    cfg = TrainConfig(max_epochs=3, warmup_epochs=1, batch_size=2, ema_decay=0.0, float64=True)
    old = train_ensemble(ethanol[:16], ethanol[16:20], tmp_path / "old", members=2,
                         model_config=SMALL, train_config=cfg, processes=1)
    tiny = TrainConfig(max_epochs=1, warmup_epochs=0, lr=1e-9, ema_decay=0.0, batch_size=8,
                       float64=True, refit_energy_shifts=False)
    new_data = (ethanol[100:140], ethanol[140:150])
    warm = train_ensemble(*new_data, tmp_path / "warm", members=2, model_config=SMALL,
                          train_config=tiny, processes=1, init_from=old)
    fresh = train_ensemble(*new_data, tmp_path / "fresh", members=2, model_config=SMALL,
                           train_config=tiny, processes=1)
    m_old, m_warm, m_fresh = (load_posterior(d).manifest for d in (old, warm, fresh))
    assert m_warm.shifts == m_old.shifts and m_fresh.shifts != m_old.shifts
    assert (m_warm.scale, m_warm.avg_neighbors) == (m_old.scale, m_old.avg_neighbors)
    assert m_warm.extra["init_from"] == str(old)
    probe = ethanol[200:204]
    p_old, p_warm, p_fresh = (load_posterior(d).predict(probe) for d in (old, warm, fresh))
    np.testing.assert_allclose(p_warm.forces, p_old.forces, atol=1e-5)
    np.testing.assert_allclose(p_warm.energy, p_old.energy, atol=1e-6)
    np.testing.assert_allclose(p_warm.forces_cov_epi, p_old.forces_cov_epi, atol=1e-6)
    assert np.abs(p_old.forces).max() > 0.1  # the old model learnt something to keep
    assert np.abs(p_fresh.forces - p_old.forces).max() > 0.1

    with pytest.raises(ValueError, match="model config differs"):
        train_ensemble(*new_data, tmp_path / "x", members=2, train_config=tiny, processes=1,
                       model_config=ModelConfig(channels=4, n_layers=1), init_from=old)
    water = [molecule("H2O") for _ in range(3)]
    for k, a in enumerate(water):
        a.rattle(0.05, seed=k)
        a.calc = None
        a.info["energy"] = -2000.0 - k
        a.arrays["forces"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"species \[1, 6, 8\], the data has \[1, 8\]"):
        train_ensemble(water[:2], water[2:], tmp_path / "y", members=1, model_config=SMALL,
                       train_config=tiny, processes=1, init_from=old)


def test_members_continue_from_the_shared_start_model(ethanol, tmp_path):
    """train.shared_start: one model trains first (its share of max_epochs) and every member
    continues from its weights. With a learning rate of 1e-9 nothing moves, so the members of
    a shared start hold the start model's weights while independent members differ; with a
    real learning rate the members' own seeds and data orders make them differ again. Every
    member's record starts with the start model's epochs; a resumed run reuses the finished
    start instead of training it again."""
    from bayesal.bayes_model.ensemble import SHARED_KEY, train_ensemble

    def weights(model) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    frozen = TrainConfig(max_epochs=2, lr=1e-9, ema_decay=0.0, batch_size=8, float64=True)
    data, probe = (ethanol[:16], ethanol[16:20]), ethanol[200:203]
    members = {}
    for share in (0.0, 0.5):
        out = train_ensemble(*data, tmp_path / f"frozen{share}", members=2, model_config=SMALL,
                             train_config=frozen.model_copy(update={"shared_start": share}),
                             processes=1)
        members[share] = [weights(m) for m in load_members(out)[0]]
    start = torch.load(tmp_path / "frozen0.5" / "work" / SHARED_KEY / "start.pt",
                       weights_only=True)["warm"]["states"][0]
    start = torch.cat([t.flatten() for n, t in start.items()
                       if n in dict(load_members(out)[0][0].named_parameters())])
    assert (members[0.0][0] - members[0.0][1]).abs().max() > 0.1
    for w in members[0.5]:
        torch.testing.assert_close(w, start.to(w.dtype), atol=1e-6, rtol=0)

    seen: list = []
    cfg = TrainConfig(max_epochs=4, batch_size=4, shared_start=0.5)
    out = train_ensemble(*data, tmp_path / "m", members=2, model_config=SMALL,
                         train_config=cfg, processes=1,
                         on_epoch=lambda k, rec: seen.append((k, rec["epoch"])))
    assert sorted(seen, key=str) == sorted(
        [(SHARED_KEY, 0), (SHARED_KEY, 1), (0, 0), (0, 1), (1, 0), (1, 1)], key=str)
    members = load_posterior(out).manifest.members
    start = members[0]["curve"][:2]
    assert all(m["shared_epochs"] == 2 and m["epochs"] == 2 and m["curve"][:2] == start
               and len(m["curve"]) == 4 for m in members)
    assert np.abs(load_posterior(out).predict(probe).forces_cov_epi).max() > 1e-8

    saved = out / "work" / SHARED_KEY / "start.pt"
    mtime, seen[:] = saved.stat().st_mtime_ns, []
    train_ensemble(*data, out, members=2, model_config=SMALL, train_config=cfg, processes=1,
                   resume=True, on_epoch=lambda k, rec: seen.append(k))
    assert SHARED_KEY not in seen and saved.stat().st_mtime_ns == mtime


def test_refitting_the_energy_shifts_removes_the_offset_and_keeps_the_forces(ethanol):
    """refit_energy_shifts: the energy residuals on the fitted structures become orthogonal
    to the species counts (for one molecule: mean residual 0), the energy MAE cannot grow,
    forces do not move."""
    from bayesal.bayes_model import _keys as K
    from bayesal.bayes_model.data import batch_graphs
    from bayesal.bayes_model.train import refit_energy_shifts

    data = prepare_data(ethanol[:12], ethanol[12:16], SMALL)
    model = small_model(data).double()
    with torch.no_grad():
        model.shifts += 0.3  # an offset of 2.7 eV on ethanol's 9 atoms
    batch = batch_graphs(data.train, dtype=torch.float64)
    before = model(batch)
    assert refit_energy_shifts(model, data.train)
    after = model(batch)
    residual = (batch[K.ENERGY] - after["energy"]).detach().numpy()
    assert abs(residual.mean()) < 1e-9
    old = (batch[K.ENERGY] - before["energy"]).detach().abs().mean()
    assert np.abs(residual).mean() <= old and old > 2.0
    torch.testing.assert_close(after["forces"], before["forces"])


def test_grad_clip_bounds_every_step_s_gradient_norm(ethanol):
    """``grad_clip``: the gradient the optimiser steps with has at most that L2 norm over
    all parameters; without it the same training steps with larger ones."""
    data = prepare_data(ethanol[:20], ethanol[20:24], SMALL)

    def step_norms(clip):
        model = small_model(data)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        norms = []
        optimizer.register_step_pre_hook(lambda opt, *_: norms.append(float(torch.linalg.norm(
            torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"]
                         if p.grad is not None])))))
        train_model(model, data.train, data.valid,
                    TrainConfig(max_epochs=2, grad_clip=clip, ema_decay=0.0),
                    optimizer=optimizer)
        return np.array(norms)

    free, clipped = step_norms(None), step_norms(0.05)
    assert len(clipped) == len(free) > 0
    assert (free > 0.05).any() and (clipped <= 0.05 * (1 + 1e-5)).all()
