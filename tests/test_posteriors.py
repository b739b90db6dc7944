"""Last-layer Laplace, SWAG and IVON: against brute-force references and their pitfalls."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch

from bayesal.bayes_model.checkpoint import CheckpointError
from bayesal.bayes_model.config import TrainingFile
from bayesal.bayes_model.data import atoms_to_graph, batch_graphs
from bayesal.bayes_model.ensemble import prepare_data
from bayesal.bayes_model.laplace import LaplaceConfig, LastLayerLaplace
from bayesal.bayes_model.model import ModelConfig
from bayesal.bayes_model.posterior import load_posterior, train_posterior
from bayesal.bayes_model.sampling import (
    IVONConfig,
    SampledPosterior,
    SWAGCollector,
    SWAGConfig,
    collect_swag,
    flat_params,
    ivon_sampled_params,
    train_ivon,
)
from bayesal.bayes_model.train import TrainConfig, build_model

TINY = ModelConfig(channels=4, n_layers=2, radial_hidden=8, l_max=1)


@pytest.fixture(scope="module")
def ethanol(shared_data):
    return ase.io.read(shared_data / "ethanol" / "train.xyz", ":80")


@pytest.fixture(scope="module")
def tiny(ethanol):
    data = prepare_data(ethanol[:40], ethanol[40:48], TINY)
    model = build_model(TINY, data.species, data.shifts, data.train, seed=1).double().eval()
    torch.manual_seed(2)
    with torch.no_grad():  # a non-trivial last layer and heads
        model.energy_head.weight.normal_(0, 0.5)
        model.logvar_head.weight.normal_(0, 0.1)
    return model, data


def brute_force_jacobians(model, graphs):
    """Energies and forces of each structure differentiated w.r.t. the last-layer weights by
    explicit autograd through the force computation (no knowledge of the linear structure)."""
    batch = batch_graphs(graphs, dtype=torch.float64)
    w0 = model.energy_head.weight.detach().clone().reshape(-1)

    def outputs(w):
        out = torch.func.functional_call(model, {"energy_head.weight": w.view(1, -1)},
                                         (batch,), {"training": True})
        return torch.cat([out["energy"], out["forces"].reshape(-1)])

    jac = torch.autograd.functional.jacobian(outputs, w0)
    out = model(batch_graphs(graphs, dtype=torch.float64))
    s = len(graphs)
    return (jac[:s], jac[s:].reshape(-1, 3, jac.shape[1]), out["energy_var"].detach(),
            out["forces_cov"].detach())


def test_laplace_matches_brute_force_ggn_covariance_and_predictions(tiny):
    model, data = tiny
    graphs = data.train[:5]
    j_e, j_f, var_e, cov_f = brute_force_jacobians(model, graphs)
    ggn_ref = (torch.einsum("sd,s,se->de", j_e, 1 / var_e, j_e)
               + torch.einsum("nid,nij,nje->de", j_f, torch.linalg.inv(cov_f), j_f)).numpy()
    ggn = LastLayerLaplace.accumulate_ggn(model, graphs, batch_size=2)  # across batches
    np.testing.assert_allclose(ggn, ggn_ref, rtol=1e-6, atol=1e-9 * np.abs(ggn_ref).max())

    delta = 0.3
    laplace = LastLayerLaplace(model, ggn, delta)
    sigma_ref = np.linalg.inv(ggn_ref + delta * np.eye(len(ggn_ref)))
    np.testing.assert_allclose(laplace.covariance, sigma_ref, rtol=1e-6,
                               atol=1e-9 * np.abs(sigma_ref).max())

    pred = laplace.predict_graphs(graphs, batch_size=3)
    var_ref = np.einsum("sd,de,se->s", j_e.numpy(), sigma_ref, j_e.numpy())
    cov_ref = np.einsum("nid,de,nje->nij", j_f.numpy(), sigma_ref, j_f.numpy())
    np.testing.assert_allclose(pred.energy_var_epi, var_ref, rtol=1e-6)
    np.testing.assert_allclose(pred.forces_cov_epi, cov_ref, rtol=1e-6,
                               atol=1e-9 * np.abs(cov_ref).max())
    np.testing.assert_allclose(pred.energy_var_ale, var_e.numpy(), rtol=1e-12)
    # the mean is the MAP model's prediction (forces from the same vmapped backward pass)
    out = model(batch_graphs(graphs, dtype=torch.float64))
    np.testing.assert_allclose(pred.forces, out["forces"].detach().numpy(), rtol=1e-10,
                               atol=1e-12)
    np.testing.assert_allclose(pred.energy, out["energy"].detach().numpy(), rtol=1e-12)
    # selection features carry the posterior metric: f_s · f_t = J_s Σ J_tᵀ
    np.testing.assert_allclose(pred.features @ pred.features.T,
                               j_e.numpy() @ sigma_ref @ j_e.numpy().T, rtol=1e-6)


def test_laplace_low_rank_forces_and_prior_by_marginal_likelihood(tiny):
    model, data = tiny
    full = LastLayerLaplace.fit(model, data.train[:20])
    assert 1e-8 < full.prior_precision < 1e8
    d = model.n_features
    low = LastLayerLaplace(model, full.ggn, full.prior_precision, force_rank=d)
    np.testing.assert_allclose(low.predict_graphs(data.valid).forces_cov_epi,
                               full.predict_graphs(data.valid).forces_cov_epi, rtol=1e-6,
                               atol=1e-12)
    one = LastLayerLaplace(model, full.ggn, full.prior_precision, force_rank=1)
    assert 0 < one.diagnostics["force_rank_trace_fraction"] <= 1
    # a rank-1 truncation can only lose variance
    assert (np.trace(one.predict_graphs(data.valid).forces_cov_epi, axis1=1, axis2=2)
            <= np.trace(full.predict_graphs(data.valid).forces_cov_epi, axis1=1, axis2=2)
            + 1e-12).all()


@pytest.mark.parametrize("rank", [None, 1])
def test_laplace_scoring_skips_the_mean_forces_and_nothing_else(tiny, ethanol, rank):
    """Scoring needs no mean forces: Laplace then saves their backward pass. Every other
    field is the full prediction's, the forces are NaN (never silently zero), and the
    scores of a pool are the same."""
    from bayesal.bayes_model.acquisition import AcquisitionConfig, score
    from bayesal.bayes_model.scoring import iter_scores

    model, data = tiny
    fitted = LastLayerLaplace.fit(model, data.train[:20])
    lap = LastLayerLaplace(model, fitted.ggn, fitted.prior_precision, force_rank=rank)
    full = lap.predict_graphs(data.valid)
    lean = lap.predict_graphs(data.valid, mean_forces=False)
    assert np.isnan(lean.forces).all() and lean.forces.shape == full.forces.shape
    for field in ("energy", "energy_var_epi", "energy_var_ale", "forces_cov_epi",
                  "forces_cov_ale", "features"):
        np.testing.assert_allclose(getattr(lean, field), getattr(full, field), rtol=1e-10,
                                   atol=1e-14, err_msg=field)
    pool = ethanol[:12]
    ((_, pred, scores),) = iter_scores(lap, iter(pool), AcquisitionConfig(chunk_size=50))
    assert np.isnan(pred.forces).all()  # the scoring path did skip them
    np.testing.assert_allclose(scores.score, score(lap.predict(pool), "bald-ef").score,
                               rtol=1e-10)


def test_laplace_variance_shrinks_with_data_and_grows_away_from_it(tiny, ethanol):
    model, data = tiny
    species, cutoff = model.species, model.config.cutoff
    held_out = data.valid
    few = LastLayerLaplace.fit(model, data.train[:3], config=LaplaceConfig(prior_precision=1.0))
    many = LastLayerLaplace.fit(model, data.train, config=LaplaceConfig(prior_precision=1.0))
    var_few = few.predict_graphs(held_out).energy_var_epi
    var_many = many.predict_graphs(held_out).energy_var_epi
    assert (var_many < var_few).all()

    far = []
    for atoms in ethanol[60:68]:  # stretched molecules: every bond 25 % longer
        a = atoms.copy()
        a.positions = a.positions.mean(0) + 1.25 * (a.positions - a.positions.mean(0))
        far.append(atoms_to_graph(a, species, cutoff, with_labels=False))
    near = many.predict_graphs(held_out)
    away = many.predict_graphs(far)
    assert away.energy_var_epi.min() > 3 * near.energy_var_epi.max()
    f_near = np.trace(near.forces_cov_epi, axis1=1, axis2=2).mean()
    f_away = np.trace(away.forces_cov_epi, axis1=1, axis2=2).mean()
    assert f_away > f_near


def test_swag_moments_equal_numpy_moments_of_the_snapshots(tiny):
    model, data = tiny
    model = build_model(TINY, data.species, data.shifts, data.train, seed=4).double()
    snapshots = []
    cfg = SWAGConfig(epochs=5, burn_in_epochs=1, max_rank=3, lr=1e-3)
    collector = collect_swag(model, data.train[:8], TrainConfig(batch_size=4, float64=True),
                             cfg, on_snapshot=lambda t: snapshots.append(t.numpy().copy()))
    theta = np.array(snapshots)
    assert collector.n == len(theta) == 5
    np.testing.assert_allclose(collector.mean.numpy(), theta.mean(0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(collector.sq_mean.numpy(), (theta**2).mean(0), rtol=1e-10,
                               atol=1e-14)
    np.testing.assert_allclose(collector.variance.numpy(),
                               np.clip(theta.var(0), 1e-30, None), rtol=1e-6, atol=1e-14)
    running = [theta[: n + 1].mean(0) for n in range(len(theta))]
    deviations = np.array([theta[n] - running[n] for n in range(len(theta))])[-3:]
    np.testing.assert_allclose(np.stack(list(collector.deviations)), deviations, rtol=1e-8,
                               atol=1e-14)
    assert not np.allclose(theta[0], theta[-1])  # training moved the weights

    # the sampling posterior: mean of many diagonal samples ≈ SWA mean, samples differ
    state = collector.state(diagonal=True)
    post = SampledPosterior("swag", model, state, samples=3, seed=0)
    draws = [flat_params(m).numpy() for m in post.models]
    assert not np.allclose(draws[0], draws[1])


def test_swag_collector_alone():
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(7, 11))
    c = SWAGCollector(11, max_rank=20)
    for x in xs:
        c.collect(torch.as_tensor(x))
    np.testing.assert_allclose(c.mean.numpy(), xs.mean(0), rtol=1e-12)
    np.testing.assert_allclose(c.variance.numpy(), xs.var(0), rtol=1e-10)


def test_ivon_exception_inside_sampling_leaves_the_weights_alone(tiny):
    import ivon

    model, data = tiny
    model = build_model(TINY, data.species, data.shifts, data.train, seed=5).double()
    opt = ivon.IVON(list(model.parameters()), lr=0.01, ess=10, hess_init=1.0)
    before = flat_params(model).clone()
    with pytest.raises(RuntimeError, match="boom"), ivon_sampled_params(opt):
        assert not torch.equal(flat_params(model), before)  # sampled weights inside
        raise RuntimeError("boom")
    assert torch.equal(flat_params(model), before)
    assert opt.state["count"] == 0  # nothing recorded from the failed sample

    # ivon-opt's own context manager leaves the sampled weights behind (the pitfall)
    with pytest.raises(RuntimeError), opt.sampled_params(train=False):
        raise RuntimeError("boom")
    assert not torch.equal(flat_params(model), before)


def test_ivon_trains_with_parameters_that_get_no_gradient(tiny, ethanol):
    model, data = tiny
    model = build_model(TINY, data.species, data.shifts, data.train, seed=6).double()
    # MSE uses neither variance head: their parameters get no gradient at all
    cfg = TrainConfig(loss="mse", batch_size=8, float64=True, warmup_epochs=0)
    mean_model, state = train_ivon(model, data.train[:16], data.valid, cfg,
                                   IVONConfig(epochs=2, lr=0.01))
    std = state["std"]
    assert std.shape == flat_params(mean_model).shape
    assert torch.isfinite(std).all() and (std > 0).all()
    post = SampledPosterior("ivon", mean_model, state, samples=4, seed=1)
    pred = post.predict(ethanol[70:73])
    assert (pred.energy_var_epi > 0).all()
    assert (np.linalg.eigvalsh(pred.forces_cov_epi + pred.forces_cov_ale) > 0).all()


@pytest.mark.parametrize("method", ["laplace", "swag", "ivon"])
def test_posterior_directories_round_trip_and_validate(method, ethanol, tmp_path):
    settings = TrainingFile(model=TINY, train=TrainConfig(max_epochs=2, warmup_epochs=1,
                                                          batch_size=8, float64=True),
                            posterior={"swag": {"epochs": 2, "burn_in_epochs": 0,
                                                "samples": 3},
                                       "ivon": {"epochs": 1, "samples": 3}})
    out = train_posterior(method, ethanol[:24], ethanol[24:30], tmp_path / "m",
                          settings=settings, processes=1)
    a = load_posterior(out)
    b = load_posterior(out)
    assert a.manifest.method == method and a.recalibration is not None
    pa, pb = a.predict(ethanol[30:33]), b.predict(ethanol[30:33])
    np.testing.assert_array_equal(pa.energy, pb.energy)
    np.testing.assert_array_equal(pa.forces_cov_epi, pb.forces_cov_epi)
    assert (pa.energy_var_epi > 0).all() and pa.features is not None

    state_file = out / f"{method}.pt"
    state_file.write_bytes(state_file.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="sha256"):
        load_posterior(out)


def _valid_nll(laplace, graphs):
    """Gaussian NLL (up to constants) of labelled graphs under the Laplace predictive."""
    pred = laplace.predict_graphs(graphs)
    e = np.array([g.energy for g in graphs])
    f = np.concatenate([g.forces for g in graphs])
    v = pred.energy_var_epi + pred.energy_var_ale
    c = pred.forces_cov_epi + pred.forces_cov_ale
    df = f - pred.forces
    z = np.linalg.solve(c, df[..., None])[..., 0]
    return 0.5 * (np.sum((e - pred.energy) ** 2 / v + np.log(v))
                  + np.sum((df * z).sum(1) + np.linalg.slogdet(c)[1]))


def test_laplace_prior_by_validation_nll_and_diagonal_structure(tiny):
    model, data = tiny
    lap = LastLayerLaplace.fit(model, data.train[:20], valid=data.valid,
                               config=LaplaceConfig(prior="valid_nll"))
    best = _valid_nll(lap, data.valid)
    for delta in (1e-6, 1e-2, 1e2, 1e6):  # any other prior fits the validation set worse
        other = LastLayerLaplace(model, lap.ggn, delta)
        assert best <= _valid_nll(other, data.valid) + 1e-9
    with pytest.raises(ValueError, match="valid_nll needs validation"):
        LastLayerLaplace.fit(model, data.train[:5], config=LaplaceConfig(prior="valid_nll"))

    diag = LastLayerLaplace(model, lap.ggn, 0.5, structure="diag")
    np.testing.assert_allclose(diag.covariance, np.diag(1 / (np.diag(lap.ggn) + 0.5)))
    pred = diag.predict_graphs(data.valid)
    assert (pred.energy_var_epi > 0).all()
    assert (np.linalg.eigvalsh(pred.forces_cov_epi) > -1e-12).all()


def _calculator_predict(calc):
    """``predict(images)`` through the ASE calculator: one structure at a time, as MD
    drives it, assembled into a Prediction."""
    from bayesal.bayes_model.predict import Prediction

    def predict(images):
        rows = []
        for atoms in images:
            atoms = atoms.copy()
            atoms.calc = calc
            atoms.get_forces()
            rows.append(dict(calc.results))
        return Prediction(
            energy=np.array([r["energy"] for r in rows]),
            energy_var_epi=np.array([r["energy_std_epistemic"] ** 2 for r in rows]),
            energy_var_ale=np.array([r["energy_std_aleatoric"] ** 2 for r in rows]),
            forces=np.concatenate([r["forces"] for r in rows]),
            forces_cov_epi=np.concatenate([r["forces_cov_epistemic"] for r in rows]),
            forces_cov_ale=np.concatenate([r["forces_cov_aleatoric"] for r in rows]),
            n_atoms=np.array([len(a) for a in images]))

    return predict


@pytest.mark.parametrize("method", ["ensemble", "laplace", "swag", "ivon"])
def test_every_posterior_and_the_calculator_obey_the_physics(method, ethanol, tmp_path):
    """Symmetries, batching and forces = −∂E/∂r hold for the predictions of every posterior
    (float64 models trained briefly) and for the ASE calculator over it."""
    from helpers import assert_prediction_physics

    from bayesal.bayes_model.calculator import BayesalCalculator

    settings = TrainingFile(model=TINY, train=TrainConfig(max_epochs=2, batch_size=8,
                                                          float64=True),
                            posterior={"swag": {"epochs": 2, "burn_in_epochs": 0,
                                                "samples": 3},
                                       "ivon": {"epochs": 1, "samples": 3}})
    out = train_posterior(method, ethanol[:24], ethanol[24:30], tmp_path / "m",
                          settings=settings, members=2, processes=1)
    posterior = load_posterior(out)
    probe = ethanol[40]
    assert_prediction_physics(posterior.predict, probe)
    assert_prediction_physics(_calculator_predict(BayesalCalculator(posterior=posterior)),
                              probe)
    _calculator_matches_predict(out, probe, tmp_path)


def _calculator_matches_predict(model_dir, probe, tmp_path):
    """One uncertainty contract: the ASE calculator returns what `bayesal predict` writes
    (recalibrated with the model's calibration.json) and the raw values under ``_raw``."""
    from typer.testing import CliRunner

    from bayesal.bayes_model.calculator import BayesalCalculator
    from bayesal.bayes_model.calibration import Recalibration
    from bayesal.cli import app

    recal = Recalibration.load(model_dir)
    assert recal is not None and recal.force_scale != 1.0  # training fitted one
    ase.io.write(tmp_path / "probe.xyz", probe)
    res = CliRunner().invoke(app, ["predict", "--model", str(model_dir), "--input",
                                   str(tmp_path / "probe.xyz"), "--output",
                                   str(tmp_path / "pred.xyz")])
    assert res.exit_code == 0, res.output
    written = ase.io.read(tmp_path / "pred.xyz")
    atoms = probe.copy()
    atoms.calc = BayesalCalculator(model_dir)
    atoms.get_forces()
    results = atoms.calc.results
    for key in ("energy", "energy_std", "energy_std_epistemic", "energy_std_aleatoric",
                "max_force_std_epistemic"):
        assert results[key] == pytest.approx(written.info["pred_" + key], rel=1e-6), key
    for key in ("forces", "forces_std", "forces_std_epistemic", "forces_std_aleatoric"):
        np.testing.assert_allclose(results[key], written.arrays["pred_" + key], rtol=1e-5,
                                   atol=1e-7, err_msg=key)
    assert results["energy_std_epistemic_raw"] ** 2 * recal.energy_scale == pytest.approx(
        results["energy_std_epistemic"] ** 2, rel=1e-9)
    np.testing.assert_allclose(results["forces_std_raw"] ** 2 * recal.force_scale,
                               results["forces_std"] ** 2, rtol=1e-9)


def test_aleatoric_recalibration_is_fitted_on_the_training_set_and_kept_by_a_refit(
        ethanol, tmp_path):
    """posterior.recal_aleatoric: calibration.json carries the aleatoric factors
    mean(r²/σ²_ale) of the model's own training residuals; `evaluate --recalibrate-on`
    refits the common scales and keeps them; without the setting they are 1."""
    from typer.testing import CliRunner

    from bayesal.bayes_model.calibration import Recalibration, aleatoric_scales
    from bayesal.cli import app

    train, valid = ethanol[:24], ethanol[24:30]
    settings = TrainingFile(model=TINY, train=TrainConfig(max_epochs=3, batch_size=8),
                            posterior={"recal_aleatoric": True})
    out = train_posterior("ensemble", train, valid, tmp_path / "m", settings=settings,
                          members=2, processes=1)
    recal = Recalibration.load(out)
    e_a, f_a = aleatoric_scales(load_posterior(out).predict(train), train)
    assert recal.energy_aleatoric_scale == pytest.approx(e_a, rel=1e-6)
    assert recal.force_aleatoric_scale == pytest.approx(f_a, rel=1e-6)
    assert abs(np.log(e_a)) > 0.1 and recal.fitted_on["aleatoric_structures"] == 24

    refit_on = tmp_path / "refit.xyz"
    ase.io.write(refit_on, ethanol[30:40], format="extxyz")
    res = CliRunner().invoke(app, ["evaluate", "--model", str(out), "--test", str(refit_on),
                                   "--recalibrate-on", str(refit_on)])
    assert res.exit_code == 0, res.output
    refit = Recalibration.load(out)
    assert refit.fitted_on["structures"] == 10 and refit.energy_scale != recal.energy_scale
    assert (refit.energy_aleatoric_scale, refit.force_aleatoric_scale) == (
        recal.energy_aleatoric_scale, recal.force_aleatoric_scale)

    plain = train_posterior("ensemble", train, valid, tmp_path / "plain", members=2,
                            processes=1, settings=TrainingFile(
                                model=TINY, train=TrainConfig(max_epochs=3, batch_size=8)))
    kept = Recalibration.load(plain)
    assert (kept.energy_aleatoric_scale, kept.force_aleatoric_scale) == (1.0, 1.0)
