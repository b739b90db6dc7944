"""``kernels: cueq`` computes the same model as e3nn: the same energies, forces, variances and
training gradients (cuEquivariance's PyTorch path here; its fused CUDA kernel in
tests/test_gpu.py), the same state dict, and clear errors where it cannot run."""

from __future__ import annotations

import sys

import ase.io
import numpy as np
import pytest
import torch

from bayesal.bayes_model.checkpoint import load_members, save_members
from bayesal.bayes_model.data import batch_graphs
from bayesal.bayes_model.ensemble import prepare_data
from bayesal.bayes_model.kernels import KernelsError, use_kernels
from bayesal.bayes_model.losses import LossKind, compute_loss
from bayesal.bayes_model.model import ModelConfig
from bayesal.bayes_model.predict import predict_members
from bayesal.bayes_model.train import build_model

pytest.importorskip("cuequivariance_torch")

CONFIG = ModelConfig(channels=6, n_layers=3, radial_hidden=16, l_max=2)  # every path kind


@pytest.fixture(scope="module")
def ethanol(shared_data):
    return ase.io.read(shared_data / "ethanol" / "train.xyz", ":24")


def _model(data, seed=0, dtype=torch.float64):
    model = build_model(CONFIG, data.species, data.shifts, data.train, seed=seed)
    with torch.no_grad():  # a non-trivial readout, so forces are not zero
        torch.manual_seed(seed + 1)
        model.energy_head.weight.normal_(0, 0.5)
    return model.to(dtype).eval()


def test_cueq_predicts_what_e3nn_predicts(ethanol):
    data = prepare_data(ethanol[:16], ethanol[16:20], CONFIG)
    models = [_model(data, s) for s in (0, 1)]
    ref = predict_members(models, ethanol[20:24])
    for m in models:
        use_kernels(m, "cueq")
    fast = predict_members(models, ethanol[20:24])
    assert np.abs(ref.forces).max() > 0.1
    np.testing.assert_allclose(fast.energy, ref.energy, rtol=0, atol=1e-6)
    for field in ("forces", "energy_var_epi", "energy_var_ale", "forces_cov_epi",
                  "forces_cov_ale", "features"):
        np.testing.assert_allclose(getattr(fast, field), getattr(ref, field), rtol=1e-6,
                                   atol=1e-8, err_msg=field)
    for m in models:  # and back
        use_kernels(m, "e3nn")
    np.testing.assert_array_equal(predict_members(models, ethanol[20:24]).forces, ref.forces)


def test_cueq_trains_like_e3nn(ethanol):
    """The force loss needs gradients of forces (double backward): one training step's
    gradients agree."""
    data = prepare_data(ethanol[:8], ethanol[8:10], CONFIG)
    grads = {}
    for kernels in ("e3nn", "cueq"):
        model = use_kernels(_model(data, 3), kernels).train()
        batch = batch_graphs(data.train[:4], dtype=torch.float64)
        out = model(batch, training=True, detach_variance=True)
        loss, _ = compute_loss(out, batch, LossKind.NLL_JEF, separate=True)
        loss.backward()
        grads[kernels] = {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}
        assert torch.isfinite(loss)
    assert grads["e3nn"].keys() == grads["cueq"].keys()
    for name, g in grads["e3nn"].items():
        torch.testing.assert_close(grads["cueq"][name], g, rtol=1e-6, atol=1e-9, msg=name)


def test_the_swap_keeps_the_state_dict(ethanol, tmp_path):
    data = prepare_data(ethanol[:8], ethanol[8:10], CONFIG)
    plain = _model(data)
    keys = list(plain.state_dict())
    fast = use_kernels(_model(data), "cueq")
    assert list(fast.state_dict()) == keys
    save_members(tmp_path, [fast], seeds=[0])  # written with cueq, read with e3nn
    (loaded,), _ = load_members(tmp_path)
    for (k, a), b in zip(plain.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a.to(b.dtype), b), k
    (again,), _ = load_members(tmp_path, kernels="cueq")
    assert "forward" in again.layers[0].tp.__dict__


def test_unknown_or_missing_kernels_are_clear_errors(ethanol, monkeypatch, tmp_path):
    data = prepare_data(ethanol[:8], ethanol[8:10], CONFIG)
    with pytest.raises(KernelsError, match="kernels: 'triton' is not known; use e3nn or cueq"):
        use_kernels(_model(data), "triton")
    monkeypatch.setitem(sys.modules, "cuequivariance_torch", None)  # not installed
    with pytest.raises(KernelsError, match="kernels: cueq needs cuequivariance-torch"):
        use_kernels(_model(data), "cueq")
    bad = tmp_path / "model.yaml"
    bad.write_text("kernels: fast\n")
    from bayesal.bayes_model.config import load_training_file

    with pytest.raises(ValueError, match=r"kernels: Input should be 'e3nn' or 'cueq'"):
        load_training_file(bad)
