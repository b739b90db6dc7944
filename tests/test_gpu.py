"""The model on a CUDA GPU (marked ``gpu``, skipped where torch sees no CUDA device):
training, predictions equal to the CPU's, equivariance, every posterior, the explorer, members
on two GPUs, a GPU-trained member resuming on the CPU. benchmarks/gpu_check.sh runs these on
a GPU machine; the CPU side of the same code is tested in tests/test_device.py."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
import torch
from helpers import TINY, assert_prediction_physics

from bayesal.bayes_model.config import TrainingFile
from bayesal.bayes_model.ensemble import prepare_data, train_ensemble
from bayesal.bayes_model.model import ModelConfig
from bayesal.bayes_model.posterior import load_posterior, train_posterior
from bayesal.bayes_model.train import TrainConfig, build_model, train_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

SMALL = ModelConfig(**TINY)
QUICK = TrainConfig(max_epochs=3, batch_size=4, min_epochs=1, allow_undertrained=True)
# float32 on two devices: the same weights, sums in another order
ENERGY_ATOL, FORCE_ATOL = 2e-4, 5e-5  # eV, eV/Å


@pytest.fixture(scope="module")
def ethanol(shared_data):
    return ase.io.read(shared_data / "ethanol" / "train.xyz", ":60")


def _close(a, b, *, scale: float = 1.0) -> None:
    np.testing.assert_allclose(a.energy, b.energy, rtol=0, atol=ENERGY_ATOL * scale)
    np.testing.assert_allclose(a.forces, b.forces, rtol=1e-4, atol=FORCE_ATOL * scale)
    for field in ("energy_var_epi", "energy_var_ale", "forces_cov_epi", "forces_cov_ale"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=2e-3,
                                   atol=1e-9 * scale, err_msg=field)


def test_an_ensemble_trained_on_cuda_predicts_like_the_cpu(ethanol, tmp_path):
    out = train_ensemble(ethanol[:40], ethanol[40:48], tmp_path / "m", members=2,
                         model_config=SMALL, train_config=QUICK, device="cuda")
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(m["device"] == "cuda:0" for m in manifest["members"])
    gpu = load_posterior(out, device="cuda")
    assert {p.device.type for m in gpu.models for p in m.parameters()} == {"cuda"}
    _close(gpu.predict(ethanol[48:60]), load_posterior(out, device="cpu").predict(ethanol[48:60]))


def test_training_steps_on_cuda_follow_the_cpu(ethanol):
    """The same start, the same data order: one epoch on each device ends at the same
    weights to float32 tolerance (the device changes where the numbers are computed, not
    what is computed)."""
    data = prepare_data(ethanol[:20], ethanol[20:24], SMALL)
    cfg = TrainConfig(max_epochs=1, batch_size=4, ema_decay=0.0, float64=True,
                      refit_energy_shifts=False)
    results = {}
    for device in ("cpu", "cuda"):
        model = build_model(SMALL, data.species, data.shifts, data.train, seed=1)
        results[device] = train_model(model, data.train, data.valid, cfg, device=device).model
    for (k, a), b in zip(results["cpu"].state_dict().items(),
                         results["cuda"].state_dict().values(), strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-7, atol=1e-9, msg=k)


def test_physics_on_cuda(ethanol, tmp_path):
    """Invariance, equivariance, permutations, batching and forces = -dE/dr of a float64
    ensemble trained and run on the GPU."""
    settings = TrainingFile(device="cuda", model=SMALL,
                            train=QUICK.model_copy(update={"float64": True}))
    out = train_posterior("ensemble", ethanol[:24], ethanol[24:30], tmp_path / "m",
                          settings=settings, members=2, processes=1)
    posterior = load_posterior(out, device="cuda")
    assert_prediction_physics(posterior.predict, ethanol[40])


@pytest.mark.parametrize("method", ["laplace", "swag", "ivon"])
def test_every_posterior_fits_on_cuda_and_predicts_like_the_cpu(method, ethanol, tmp_path):
    settings = TrainingFile(device="cuda", model=SMALL, train=QUICK)
    out = train_posterior(method, ethanol[:30], ethanol[30:36], tmp_path / method,
                          settings=settings)
    _close(load_posterior(out, device="cuda").predict(ethanol[40:48]),
           load_posterior(out, device="cpu").predict(ethanol[40:48]), scale=5.0)


def test_the_explorer_runs_on_cuda(ethanol, tmp_path):
    from bayesal.bayes_model.explore import explore

    out = train_ensemble(ethanol[:30], ethanol[30:36], tmp_path / "m", members=2,
                         model_config=SMALL, train_config=QUICK, device="cuda")
    posterior = load_posterior(out, device="cuda")
    trajectories = explore(posterior, ethanol[40:42], temperatures_K=[300.0], steps=20,
                           timestep_fs=0.5, friction_per_fs=0.02,
                           max_force_std_threshold=100.0, record_every=5, seed=0)
    frames = [f for t in trajectories for f in t.frames]
    assert frames and all(np.isfinite(f.positions).all() for f in frames)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two visible GPUs")
def test_members_spread_over_two_gpus(ethanol, tmp_path):
    out = train_ensemble(ethanol[:30], ethanol[30:36], tmp_path / "m", members=4,
                         model_config=SMALL, train_config=QUICK, device="auto")
    devices = [m["device"] for m in json.loads((out / "manifest.json").read_text())["members"]]
    assert devices == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]


def test_a_member_trained_on_cuda_resumes_on_the_cpu(ethanol, tmp_path):
    data = prepare_data(ethanol[:20], ethanol[20:24], SMALL)
    cfg = TrainConfig(max_epochs=3, batch_size=4, seed=5)

    def model():
        return build_model(SMALL, data.species, data.shifts, data.train, seed=5)

    train_model(model(), data.train, data.valid, cfg.model_copy(update={"max_epochs": 2}),
                work_dir=tmp_path, device="cuda")
    resumed = train_model(model(), data.train, data.valid, cfg, work_dir=tmp_path,
                          resume=True, device="cpu")
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert {p.device.type for p in resumed.model.parameters()} == {"cpu"}


def test_fused_cueq_kernels_equal_e3nn_on_cuda(ethanol):
    """kernels: cueq with cuEquivariance's fused CUDA kernels: the same energies, forces and
    uncertainties as e3nn on the same GPU (float32), and the same training gradients."""
    pytest.importorskip("cuequivariance_ops_torch")
    from bayesal.bayes_model.data import batch_graphs
    from bayesal.bayes_model.kernels import use_kernels
    from bayesal.bayes_model.losses import LossKind, compute_loss
    from bayesal.bayes_model.predict import predict_members

    config = ModelConfig(channels=32, n_layers=2, l_max=2)
    data = prepare_data(ethanol[:16], ethanol[16:20], config)
    models = []
    for seed in (0, 1):
        m = build_model(config, data.species, data.shifts, data.train, seed=seed)
        with torch.no_grad():
            m.energy_head.weight.normal_(0, 0.5)
        models.append(m.to("cuda").eval())
    ref = predict_members(models, ethanol[20:30])
    grads = {}
    for kernels in ("e3nn", "cueq"):
        model = use_kernels(models[0], kernels).train()
        model.zero_grad()
        batch = batch_graphs(data.train[:8], device="cuda")
        out = model(batch, training=True, detach_variance=True)
        compute_loss(out, batch, LossKind.NLL_JEF, separate=True)[0].backward()
        grads[kernels] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for a, b in zip(grads["e3nn"], grads["cueq"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
    for m in models:
        use_kernels(m.eval(), "cueq")
    _close(predict_members(models, ethanol[20:30]), ref)
