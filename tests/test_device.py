"""Where the model runs (bayes_model.device), on a machine without a GPU: the settings, the
errors, members spread over GPUs, GPU-written checkpoints loading on the CPU, and batches
split when a GPU runs out of memory. The GPU itself: tests/test_gpu.py."""

from __future__ import annotations

import json
import re

import ase.io
import numpy as np
import pytest
import torch
import torch.serialization
import yaml
from helpers import TINY
from typer.testing import CliRunner

from bayesal.bayes_model.checkpoint import load_members, save_members
from bayesal.bayes_model.config import TrainingFile, default_yaml
from bayesal.bayes_model.device import (
    DeviceError,
    member_devices,
    resolve_device,
    split_on_oom,
)
from bayesal.bayes_model.ensemble import prepare_data
from bayesal.bayes_model.model import ModelConfig
from bayesal.bayes_model.posterior import load_posterior, plan_training
from bayesal.bayes_model.predict import predict_members
from bayesal.bayes_model.train import TrainConfig, build_model, train_model
from bayesal.cli import app

SMALL = ModelConfig(**TINY)
NO_CUDA = not torch.cuda.is_available()
runner = CliRunner()


@pytest.fixture(scope="module")
def ethanol(shared_data):
    return ase.io.read(shared_data / "ethanol" / "train.xyz", ":30")


def test_settings_resolve_to_devices():
    assert resolve_device("cpu", cuda_count=2) == torch.device("cpu")
    assert resolve_device("auto", cuda_count=0) == torch.device("cpu")
    assert resolve_device("auto", cuda_count=2) == torch.device("cuda", 0)
    assert resolve_device("cuda", cuda_count=1) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", cuda_count=2) == torch.device("cuda", 1)
    if NO_CUDA:  # this machine: auto is the CPU
        assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize(("setting", "count", "message"), [
    ("cuda", 0, r"--device: 'cuda' asks for a CUDA GPU, but .*(without CUDA|sees no CUDA)"),
    ("cuda:0", 0, r"asks for a CUDA GPU"),
    ("cuda:2", 2, r"'cuda:2' asks for GPU 2, but 2 are visible \(cuda:0 to cuda:1\)"),
    ("cuda:1", 1, r"but 1 is visible"),
    ("gpu", 1, r"'gpu' is not a device; use auto, cpu, cuda or cuda:K"),
    ("cuda:x", 1, r"is not a device"),
])
def test_a_device_the_machine_lacks_is_one_clear_line(setting, count, message):
    with pytest.raises(DeviceError, match=message) as err:
        resolve_device(setting, what="--device", cuda_count=count)
    assert "\n" not in str(err.value)


def test_members_spread_over_the_visible_gpus():
    gpu = [torch.device("cuda", k) for k in range(3)]
    assert member_devices("auto", 4, cuda_count=2) == [gpu[0], gpu[1], gpu[0], gpu[1]]
    assert member_devices("cuda", 5, cuda_count=3) == [gpu[0], gpu[1], gpu[2], gpu[0], gpu[1]]
    assert member_devices("cuda:1", 3, cuda_count=2) == [gpu[1]] * 3  # pinned: all on one
    assert member_devices("auto", 2, cuda_count=0) == [torch.device("cpu")] * 2
    assert member_devices("cpu", 2, cuda_count=4) == [torch.device("cpu")] * 2
    with pytest.raises(DeviceError):
        member_devices("cuda", 2, cuda_count=0)


def test_the_device_setting_is_validated_where_it_is_written(tmp_path):
    assert TrainingFile().device == "auto"
    assert "\ndevice: auto\n" in "\n" + default_yaml()  # --print-config shows it
    bad = tmp_path / "model.yaml"
    bad.write_text("device: gpu0\n")
    from bayesal.bayes_model.config import load_training_file

    with pytest.raises(ValueError, match=r"model.yaml: invalid settings:\n  device: String "
                                         r"should match pattern"):
        load_training_file(bad)
    with pytest.raises(DeviceError, match="--device: 'tpu' is not a device"):
        plan_training("ensemble", 2, device="tpu")
    assert plan_training("ensemble", 2, device="cpu").settings.device == "cpu"


def _gpu_tagged(monkeypatch):
    """Make torch.save write every tensor as if it lived on cuda:0 (what a file written on
    a GPU node holds); such a file cannot be read on a machine without CUDA unless the
    reader maps it onto the host."""
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_a_model_written_on_a_gpu_loads_and_predicts_on_the_cpu(ethanol, tmp_path,
                                                                monkeypatch):
    data = prepare_data(ethanol[:20], ethanol[20:24], SMALL)
    models = [build_model(SMALL, data.species, data.shifts, data.train, seed=s).eval()
              for s in (0, 1)]
    with monkeypatch.context() as m:
        _gpu_tagged(m)
        save_members(tmp_path, models, seeds=[0, 1])
    with pytest.raises(RuntimeError, match="CUDA"):  # the file really says cuda:0
        torch.load(tmp_path / "member_0.pt", weights_only=True)
    loaded, _ = load_members(tmp_path)
    assert {p.device for m in loaded for p in m.parameters()} == {torch.device("cpu")}
    a = predict_members(models, ethanol[24:27])
    b = load_posterior(tmp_path, device="auto").predict(ethanol[24:27])
    np.testing.assert_array_equal(a.energy, b.energy)
    np.testing.assert_array_equal(a.forces, b.forces)


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_training_written_on_a_gpu_resumes_on_the_cpu(ethanol, tmp_path, monkeypatch):
    """The resumable state (weights, Adam moments, EMA, data order) of a member trained on
    a GPU node continues on a CPU node: the same numbers as resuming a CPU-written state."""
    data = prepare_data(ethanol[:16], ethanol[16:20], SMALL)
    cfg = TrainConfig(max_epochs=3, batch_size=4, float64=True, seed=2)

    def model():
        return build_model(SMALL, data.species, data.shifts, data.train, seed=2)

    train_model(model(), data.train, data.valid, cfg.model_copy(update={"max_epochs": 2}),
                work_dir=tmp_path)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    plain = train_model(model(), data.train, data.valid, cfg, work_dir=tmp_path, resume=True)
    with monkeypatch.context() as m:
        _gpu_tagged(m)
        torch.save(state, tmp_path / "train_state.pt")
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(tmp_path / "train_state.pt", weights_only=True)
    resumed = train_model(model(), data.train, data.valid, cfg, work_dir=tmp_path,
                          resume=True, device="cpu")
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    for (k, a), b in zip(plain.model.state_dict().items(),
                         resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def _oom_above(limit: int):
    calls = []

    def fn(idx):
        calls.append(list(idx))
        if len(idx) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return [i * 10 for i in idx]
    return fn, calls


def test_a_batch_that_does_not_fit_the_gpu_is_split_not_moved_to_the_cpu():
    fn, calls = _oom_above(2)
    parts = split_on_oom(fn, list(range(7)))
    assert [x for p in parts for x in p] == [i * 10 for i in range(7)]  # same, in order
    fitted = [c for c in calls if len(c) <= 2]  # the halves that ran, each structure once
    assert [i for c in fitted for i in c] == list(range(7)) and len(fitted) == len(parts)
    fn, _ = _oom_above(0)
    with pytest.raises(DeviceError, match=r"out of GPU memory predicting a single structure "
                                          r"\(CUDA out of memory.*--device cpu"):
        split_on_oom(fn, [0, 1, 2])


def test_predictions_split_on_out_of_memory_equal_the_whole_batch(ethanol, monkeypatch):
    data = prepare_data(ethanol[:12], ethanol[12:14], SMALL)
    models = [build_model(SMALL, data.species, data.shifts, data.train, seed=s).eval()
              for s in (0, 1)]
    whole = predict_members(models, ethanol[14:19], batch_size=8)
    forward = type(models[0]).forward

    def small_gpu(self, batch, **kwargs):
        if batch["n_atoms"].shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return forward(self, batch, **kwargs)

    monkeypatch.setattr(type(models[0]), "forward", small_gpu)
    split = predict_members(models, ethanol[14:19], batch_size=8)
    for field in ("energy", "energy_var_epi", "forces", "forces_cov_epi", "features"):
        np.testing.assert_allclose(getattr(split, field), getattr(whole, field), rtol=1e-5,
                                   atol=1e-6)


def test_training_out_of_gpu_memory_says_what_to_lower(ethanol, monkeypatch):
    data = prepare_data(ethanol[:8], ethanol[8:10], SMALL)
    model = build_model(SMALL, data.species, data.shifts, data.train)

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(type(model), "forward", no_memory)
    with pytest.raises(DeviceError, match=r"out of GPU memory on cpu training batches of 4 "
                                          r"structures \(up to 9 atoms each\): lower "
                                          r"train.batch_size"):
        train_model(model, data.train, data.valid, TrainConfig(max_epochs=1, batch_size=4))


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m", "", text))


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "predict", "evaluate", "score", "md"])
def test_cli_device_cuda_without_cuda_is_one_line_and_writes_nothing(command, ethanol,
                                                                     tmp_path):
    ase.io.write(tmp_path / "data.xyz", ethanol[:6])
    data, out = str(tmp_path / "data.xyz"), tmp_path / "out"
    args = {"train": ["--train", data, "--out", str(out), "--members", "1"],
            "predict": ["--model", str(out), "--input", data, "--output", str(out / "p.xyz")],
            "evaluate": ["--model", str(out), "--test", data],
            "score": ["--model", str(out), "--pool", data, "--output", str(out / "s.xyz")],
            "md": ["--model", str(out), "--input", data, "--output", str(out / "md.xyz")]}
    res = runner.invoke(app, [command, *args[command], "--device", "cuda"])
    assert res.exit_code == 1, res.output
    text = _plain(res.output)
    assert "error: --device: 'cuda' asks for a CUDA GPU, but this torch" in text, text
    assert "Traceback" not in res.output and not out.exists()


def test_train_reports_the_device_and_records_it_per_member(ethanol, tmp_path):
    ase.io.write(tmp_path / "data.xyz", ethanol[:12])
    cfg = tmp_path / "model.yaml"
    cfg.write_text(yaml.safe_dump({"device": "cpu", "model": TINY,
                                   "train": {"max_epochs": 2, "batch_size": 4,
                                             "min_epochs": 1, "allow_undertrained": True}}))
    res = runner.invoke(app, ["train", "--train", str(tmp_path / "data.xyz"), "--out",
                              str(tmp_path / "m"), "--members", "2", "--config", str(cfg),
                              "--valid-fraction", "0.25"])
    assert res.exit_code == 0, res.output
    assert "on cpu" in _plain(res.output)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert [m["device"] for m in manifest["members"]] == ["cpu", "cpu"]


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_a_campaign_asking_for_a_gpu_stops_before_any_work(tmp_path, shared_data,
                                                          monkeypatch):
    from helpers import ethanol_campaign

    url = f"sqlite:///{tmp_path / 'bayesal.db'}"
    monkeypatch.setenv("BAYESAL_DATABASE_URL", url)
    config = ethanol_campaign(tmp_path, shared_data, device="cuda:0")
    res = runner.invoke(app, ["run", str(config)])
    assert res.exit_code == 1, res.output
    assert "campaign.yaml: device: 'cuda:0' asks for a CUDA GPU" in _plain(res.output)
    assert not (tmp_path / "bayesal.db").exists()  # nothing imported, nothing labelled


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_run_device_overrides_the_campaign_yaml(tmp_path, shared_data, prefect_api):
    """`bayesal run --device cuda` stops before any work where there is no GPU, whatever the
    YAML says; `--device cpu` runs a campaign whose YAML asks for a GPU, on the CPU (the
    round's members record it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import ethanol_campaign

    db = tmp_path / "bayesal.db"
    env = {**os.environ, "BAYESAL_DATABASE_URL": f"sqlite:///{db}",
           "BAYESAL_DATA_DIR": str(tmp_path / "data"), "PREFECT_API_URL": prefect_api}
    bayesal = str(Path(sys.executable).with_name("bayesal"))
    config = ethanol_campaign(tmp_path, shared_data, stop={"max_rounds": 1})
    out = subprocess.run([bayesal, "run", str(config), "--device", "cuda"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "error: --device: 'cuda' asks for a CUDA GPU" in _plain(out.stderr), out.stderr
    assert not db.exists()

    config = ethanol_campaign(tmp_path, shared_data, device="cuda:0", stop={"max_rounds": 1})
    out = subprocess.run([bayesal, "run", str(config), "--device", "cpu"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    manifests = list((tmp_path / "data").rglob("round-*/model/manifest.json"))
    assert manifests
    for path in manifests:
        assert {m["device"] for m in json.loads(path.read_text())["members"]} == {"cpu"}
