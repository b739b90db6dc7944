"""Calibration, recalibration and OOD metrics against hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from bayesal.bayes_model.calibration import (
    Recalibration,
    auroc,
    calibration_metrics,
    coverage,
    ence,
    fit_recalibration,
    miscalibration_area,
    ood_auroc,
    plot_calibration,
    reliability_curve,
)
from bayesal.bayes_model.predict import Prediction


def labelled_case(rng, n_struct=400, n_atoms=3, sigma_scale=1.0, heavy_tails=False):
    """Structures whose labels deviate from the prediction by draws from the predicted
    Gaussians (σ scaled by ``sigma_scale``: < 1 means an overconfident model)."""
    e_std = rng.uniform(0.01, 0.2, n_struct)
    f_std = rng.uniform(0.02, 0.5, (n_struct * n_atoms, 3))
    draw = (lambda size: rng.laplace(size=size) / np.sqrt(2)) if heavy_tails else rng.normal
    e_pred = rng.normal(size=n_struct)
    f_pred = rng.normal(size=(n_struct * n_atoms, 3))
    e_true = e_pred + e_std * draw(size=n_struct)
    f_true = f_pred + f_std * draw(size=f_pred.shape)
    images = []
    for s in range(n_struct):
        a = Atoms("H3", positions=rng.normal(size=(3, 3)) * 3)
        a.calc = SinglePointCalculator(a, energy=e_true[s],
                                       forces=f_true[s * n_atoms:(s + 1) * n_atoms])
        images.append(a)
    var_e = (e_std * sigma_scale) ** 2
    cov_f = np.zeros((len(f_std), 3, 3))
    idx = np.arange(3)
    cov_f[:, idx, idx] = (f_std * sigma_scale) ** 2
    pred = Prediction(energy=e_pred, energy_var_epi=0.3 * var_e, energy_var_ale=0.7 * var_e,
                      forces=f_pred, forces_cov_epi=0.3 * cov_f, forces_cov_ale=0.7 * cov_f,
                      n_atoms=np.full(n_struct, n_atoms))
    return pred, images


def test_calibrated_gaussians_score_as_calibrated():
    pred, images = labelled_case(np.random.default_rng(0))
    m = calibration_metrics(pred, images)
    assert m["force_miscal_area"] < 0.02 and m["energy_miscal_area"] < 0.04
    assert m["force_coverage68"] == pytest.approx(0.6827, abs=0.02)
    assert m["force_coverage95"] == pytest.approx(0.9545, abs=0.01)
    assert m["force_ence"] < 0.1


def test_overconfidence_is_detected_and_fixed_by_variance_scaling():
    rng = np.random.default_rng(1)
    pred, images = labelled_case(rng, sigma_scale=1 / 3)
    before = calibration_metrics(pred, images)
    assert before["force_miscal_area"] > 0.1 and before["force_coverage95"] < 0.6
    valid_pred, valid_images = labelled_case(rng, sigma_scale=1 / 3)
    recal = fit_recalibration(valid_pred, valid_images)
    assert recal.force_scale == pytest.approx(9.0, rel=0.1)
    assert recal.energy_scale == pytest.approx(9.0, rel=0.25)
    after = calibration_metrics(pred, images, recalibration=recal)
    assert after["force_miscal_area_recal"] < 0.02
    assert after["force_coverage95_recal"] == pytest.approx(0.9545, abs=0.015)
    # means untouched, both variance parts scaled
    fixed = recal.apply(pred)
    np.testing.assert_array_equal(fixed.forces, pred.forces)
    np.testing.assert_allclose(fixed.forces_cov_epi, pred.forces_cov_epi * recal.force_scale)


def test_recalibration_prior_tempers_a_fit_on_few_structures():
    rng = np.random.default_rng(4)
    # one validation structure the model happens to get almost exactly right
    pred, images = labelled_case(rng, n_struct=1)
    e_err = images[0].get_potential_energy() - pred.energy[0]
    e_var = pred.energy_var_epi[0] + pred.energy_var_ale[0]
    z2 = e_err**2 / e_var
    mle = fit_recalibration(pred, images, prior_weight=0)
    assert mle.energy_scale == pytest.approx(z2)
    prior = fit_recalibration(pred, images, prior_weight=1)  # a pseudo-structure at scale 1
    assert prior.energy_scale == pytest.approx((1 + z2) / 2)
    assert prior.fitted_on == {"structures": 1, "force_components": 9, "prior_weight": 1.0}
    # forces: the pseudo-structure weighs as many components as a real structure has
    f_z2 = (((np.array([a.get_forces() for a in images]).reshape(-1, 3) - pred.forces) ** 2)
            / np.diagonal(pred.forces_cov_epi + pred.forces_cov_ale, axis1=1, axis2=2))
    assert prior.force_scale == pytest.approx((9 + f_z2.sum()) / 18)
    # with many structures the prior hardly matters
    pred, images = labelled_case(rng, sigma_scale=1 / 3)
    a = fit_recalibration(pred, images)
    b = fit_recalibration(pred, images, prior_weight=0)
    assert a.energy_scale == pytest.approx(b.energy_scale, rel=0.03)
    assert a.force_scale == pytest.approx(b.force_scale, rel=0.003)
    with pytest.raises(ValueError, match="prior_weight must be >= 0"):
        fit_recalibration(pred, images, prior_weight=-1)


def test_isotonic_fixes_what_a_variance_scale_cannot(tmp_path):
    rng = np.random.default_rng(2)
    pred, images = labelled_case(rng, heavy_tails=True)
    valid_pred, valid_images = labelled_case(rng, heavy_tails=True)
    scale_only = fit_recalibration(valid_pred, valid_images)
    iso = fit_recalibration(valid_pred, valid_images, isotonic=True)
    a = calibration_metrics(pred, images, recalibration=scale_only)["force_miscal_area_recal"]
    b = calibration_metrics(pred, images, recalibration=iso)["force_miscal_area_recal"]
    assert b < 0.5 * a and b < 0.02
    iso.save(tmp_path)
    loaded = Recalibration.load(tmp_path)
    assert loaded == iso
    (tmp_path / "calibration.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"calibration\.json is corrupted"):
        Recalibration.load(tmp_path)


def test_elementary_metrics_by_hand():
    assert miscalibration_area(np.linspace(0, 1, 10001)) == pytest.approx(0, abs=1e-3)
    assert miscalibration_area(np.full(100, 0.5)) == pytest.approx(0.25, abs=0.01)
    assert coverage(np.array([0.1, 0.5, 0.9, 0.99]), 0.9545) == 0.75
    uniform = reliability_curve(np.linspace(0, 1, 10001))
    assert list(uniform) == list(range(10, 100, 10))
    assert all(uniform[q] == pytest.approx(q / 100, abs=1e-3) for q in uniform)
    # over-confident: all PIT values in the tails -> the curve leaves the diagonal
    tails = reliability_curve(np.array([0.01, 0.02, 0.98, 0.99]))
    assert tails[10] == 0.5 and tails[50] == 0.5 and tails[90] == 0.5
    assert ence(np.array([1.0, -1.0, 2.0, -2.0]), np.array([1.0, 1.0, 2.0, 2.0]), bins=2) == 0
    assert ence(np.array([2.0, 2.0]), np.array([1.0, 1.0]), bins=1) == 1.0
    assert auroc([0.1, 0.2, 0.3], [0.5, 0.6]) == 1.0
    assert auroc([0.5, 0.6], [0.1, 0.2, 0.3]) == 0.0
    assert auroc([1.0, 1.0], [1.0, 1.0]) == 0.5
    with pytest.raises(ValueError):
        auroc([], [1.0])


def test_ood_auroc_and_plots(tmp_path):
    rng = np.random.default_rng(3)
    pred, images = labelled_case(rng, n_struct=50)
    far = Prediction(**{**pred.__dict__, "energy_var_epi": pred.energy_var_epi + 10,
                        "forces_cov_epi": pred.forces_cov_epi + 10 * np.eye(3)})
    out = ood_auroc(pred, far)
    assert out == {"ood_auroc_energy": 1.0, "ood_auroc_force": 1.0}
    paths = plot_calibration(pred, images, tmp_path, "case",
                             recalibration=fit_recalibration(pred, images))
    assert all(p.stat().st_size > 10_000 for p in paths) and len(paths) == 2


def test_aleatoric_rescale_fixes_a_too_wide_noise_head_that_a_common_scale_cannot(tmp_path):
    """Labels deviate by the epistemic σ and a noise 5x narrower than the model's aleatoric
    σ: the aleatoric part is scaled by mean(r²/σ²_ale) of the training residuals (≈ 1/25 plus
    the epistemic share), the common scales are then fitted on validation, held-out coverage
    comes out right, and BALD's energy term, ½ log(1 + v_epi/v_ale), grows by the change of
    the ratio, which a common scale of both parts leaves alone."""
    from bayesal.bayes_model.acquisition import bald_energy
    from bayesal.bayes_model.calibration import aleatoric_scales

    rng = np.random.default_rng(7)

    def case(n):
        pred, images = labelled_case(rng, n_struct=n)  # labels drawn with σ² = v_epi + v_ale
        noise_e = pred.energy_var_ale  # the true noise variance: the head says 25x that
        return (Prediction(**{**pred.__dict__, "energy_var_ale": 25 * noise_e,
                              "forces_cov_ale": 25 * pred.forces_cov_ale}), images)

    train, valid, test = case(600), case(600), case(600)
    e_a, f_a = aleatoric_scales(*train)
    e_err = np.array([a.get_potential_energy() for a in train[1]]) - train[0].energy
    assert e_a == pytest.approx(np.mean(e_err**2 / train[0].energy_var_ale))
    # r² ≈ v_epi + v_noise = (0.3 + 0.7) var, and the head says v_ale = 25 x 0.7 var
    assert e_a == pytest.approx((0.3 / 0.7 + 1) / 25, rel=0.2)
    assert f_a == pytest.approx((0.3 / 0.7 + 1) / 25, rel=0.05)

    plain = fit_recalibration(*valid)
    fixed = fit_recalibration(*valid, aleatoric_on=train)
    assert (fixed.energy_aleatoric_scale, fixed.force_aleatoric_scale) == (e_a, f_a)
    assert fixed.fitted_on["aleatoric_structures"] == 600
    for recal in (plain, fixed):  # both cover right overall: a common scale fixes that...
        m = calibration_metrics(*test, recalibration=recal)
        assert m["force_coverage68_recal"] == pytest.approx(0.6827, abs=0.03)
    # ...but only the aleatoric scale moves the information BALD sees
    raw, p, f = test[0], plain.apply(test[0]), fixed.apply(test[0])
    np.testing.assert_allclose(bald_energy(p.energy_var_epi, p.energy_var_ale),
                               bald_energy(raw.energy_var_epi, raw.energy_var_ale))
    np.testing.assert_allclose(bald_energy(f.energy_var_epi, f.energy_var_ale),
                               bald_energy(raw.energy_var_epi, e_a * raw.energy_var_ale))
    assert np.all(bald_energy(f.energy_var_epi, f.energy_var_ale)
                  > 5 * bald_energy(raw.energy_var_epi, raw.energy_var_ale))
    # kept as given (a later refit on new validation data keeps the training-set factors)
    again = fit_recalibration(*valid, aleatoric=(e_a, f_a))
    assert again.energy_scale == pytest.approx(fixed.energy_scale)
    fixed.save(tmp_path)
    np.testing.assert_allclose(Recalibration.load(tmp_path).apply(raw).energy_var_ale,
                               f.energy_var_ale)
