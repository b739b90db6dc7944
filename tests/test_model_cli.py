"""`bayesal train / predict / evaluate` as users run them."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
from typer.testing import CliRunner

from bayesal.cli import app

runner = CliRunner()

CONFIG = """
model: {channels: 8, n_layers: 2, radial_hidden: 16}
train: {max_epochs: 2, warmup_epochs: 1, batch_size: 8}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("model")
    data = root / "train.xyz"
    ase.io.write(data, ase.io.read(shared_data / "ethanol" / "train.xyz", ":40"),
                 format="extxyz")
    cfg = root / "model.yaml"
    cfg.write_text(CONFIG)
    res = runner.invoke(app, ["train", "--train", str(data), "--out", str(root / "m"),
                              "--members", "2", "--config", str(cfg), "--processes", "1",
                              "--isolated-atoms", str(shared_data / "ethanol" /
                                                      "isolated_atoms.xyz")],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return root


def test_train_writes_a_loadable_model(trained):
    manifest = json.loads((trained / "m" / "manifest.json").read_text())
    assert manifest["method"] == "ensemble" and len(manifest["members"]) == 2
    assert manifest["config"]["channels"] == 8 and manifest["species"] == [1, 6, 8]
    assert [m["seed"] for m in manifest["members"]] == [0, 1]
    assert manifest["extra"]["n_valid"] == 2  # 5 % of 40


def test_predict_and_evaluate(trained, shared_data, tmp_path):
    test = shared_data / "ethanol" / "test_MD.xyz"
    small = tmp_path / "test.xyz"
    ase.io.write(small, ase.io.read(test, ":10"), format="extxyz")
    out = tmp_path / "pred.xyz"
    res = runner.invoke(app, ["predict", "--model", str(trained / "m"), "--input", str(small),
                              "--output", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    pred = ase.io.read(out, ":")
    assert len(pred) == 10
    a = pred[0]
    assert a.info["pred_energy_std"] ** 2 == pytest.approx(
        a.info["pred_energy_std_epistemic"] ** 2 + a.info["pred_energy_std_aleatoric"] ** 2,
        rel=1e-6)
    assert a.arrays["pred_forces"].shape == (9, 3) and (a.arrays["pred_forces_std"] > 0).all()

    res = runner.invoke(app, ["evaluate", "--model", str(trained / "m"), "--test", str(small),
                              "--json", str(tmp_path / "m.json")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "m.json").read_text())[str(small)]
    ref = ase.io.read(small, ":")
    mae = np.mean([np.abs(p.arrays["pred_forces"] - r.get_forces()).mean()
                   for p, r in zip(pred, ref, strict=True)])
    assert metrics["force_mae"] == pytest.approx(mae, rel=1e-6)
    assert {"energy_nll", "force_nll", "force_spearman", "energy_mae_per_atom"} <= set(metrics)


def test_bad_config_and_unlabelled_data_are_clear_errors(tmp_path, shared_data):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: {l_max: 7, chanels: 3}\n")
    data = tmp_path / "t.xyz"
    ase.io.write(data, ase.io.read(shared_data / "ethanol" / "train.xyz", ":4"), format="extxyz")
    res = runner.invoke(app, ["train", "--train", str(data), "--out", str(tmp_path / "m"),
                              "--config", str(cfg)])
    assert res.exit_code == 1
    assert "model.l_max" in res.output and "model.chanels" in res.output
    bare = tmp_path / "bare.xyz"
    ase.io.write(bare, [a.copy() for a in ase.io.read(data, ":")], format="extxyz")
    res = runner.invoke(app, ["train", "--train", str(bare), "--out", str(tmp_path / "m")])
    assert res.exit_code == 1 and "bare.xyz, frame 0, field 'energy'" in res.output
    res = runner.invoke(app, ["predict", "--model", str(tmp_path / "nope"), "--input",
                              str(data), "--output", str(tmp_path / "o.xyz")])
    assert res.exit_code == 1 and "not a bayesal model directory" in res.output


def test_md_writes_frames_whose_uncertainties_equal_a_direct_prediction(trained, shared_data,
                                                                        tmp_path):
    """`bayesal md`: Langevin MD with the model; every written frame's stored energy,
    forces and (recalibrated) uncertainties are what `predict` gives for its positions."""
    from bayesal.bayes_model.posterior import load_posterior
    from bayesal.bayes_model.predict import predict_calibrated, structure_results

    start = tmp_path / "start.xyz"
    ase.io.write(start, ase.io.read(shared_data / "ethanol" / "test_MD.xyz", "3"))
    out = tmp_path / "md.xyz"
    res = runner.invoke(app, ["md", "--model", str(trained / "m"), "--input", str(start),
                              "--output", str(out), "--steps", "12", "--interval", "4",
                              "--temperature", "500"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    frames = ase.io.read(out, ":")
    assert [a.info["step"] for a in frames] == [0, 4, 8, 12]
    assert frames[0].positions == pytest.approx(ase.io.read(start).positions, abs=1e-8)
    assert not np.allclose(frames[-1].positions, frames[0].positions)  # it moved
    assert all(a.info["time_fs"] == pytest.approx(0.5 * a.info["step"]) for a in frames)
    direct = predict_calibrated(load_posterior(trained / "m"), frames)
    for k, a in enumerate(frames):
        want = structure_results(direct, k)
        for key in ("energy", "energy_std", "energy_std_epistemic", "energy_std_aleatoric",
                    "max_force_std_epistemic"):
            assert a.info["pred_" + key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
        for key in ("forces", "forces_std", "forces_std_epistemic", "forces_std_aleatoric"):
            np.testing.assert_allclose(a.arrays["pred_" + key], want[key], rtol=1e-4,
                                       atol=1e-6, err_msg=key)

    # the stop rule: a threshold below any uncertainty ends the run at the first step
    res = runner.invoke(app, ["md", "--model", str(trained / "m"), "--input", str(start),
                              "--output", str(out), "--steps", "50", "--interval", "10",
                              "--stop-above", "1e-9"], catch_exceptions=False)
    assert res.exit_code == 0 and "stopped at step 1" in res.output, res.output
    assert [a.info["step"] for a in ase.io.read(out, ":")] == [0, 1]
    res = runner.invoke(app, ["md", "--model", str(trained / "m"), "--input", str(start),
                              "--output", str(out), "--frame", "5"])
    assert res.exit_code == 1 and "--frame 5" in res.output and "1 frame" in res.output


def test_train_refuses_an_undertrained_model_unless_allowed(trained, tmp_path):
    """A budget too small to train: exit 1 with one line naming the errors against the
    trivial predictor and the epochs; --allow-undertrained keeps the model with a warning.
    The trained fixture passed the check and says so."""
    from bayesal.bayes_model.quality import Quality

    q = Quality.load(trained / "m")
    assert q is not None and q.ok and q.force_mae < q.baseline_force_mae
    args = ["train", "--train", str(trained / "train.xyz"), "--members", "1",
            "--config", str(trained / "model.yaml"), "--max-minutes", "0.0001"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert res.exit_code == 1
    message = res.output[res.output.index("error: "):]
    assert "under-trained" in message and "after 0 epoch(s)" in message
    assert "--allow-undertrained" in message and len(message.strip().splitlines()) == 1
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--allow-undertrained"])
    assert res.exit_code == 0, res.output
    assert "warning: model" in res.output and (tmp_path / "b" / "manifest.json").is_file()


def test_evaluate_logs_progress_with_a_total_and_chunks_change_no_number(trained, shared_data,
                                                                         tmp_path):
    """`bayesal evaluate` with stderr to a file writes progress lines with the total; the
    chunked prediction behind it equals one prediction of the whole file."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from bayesal.bayes_model.posterior import load_posterior
    from bayesal.bayes_model.predict import predict_in_chunks

    test = tmp_path / "test.xyz"
    ase.io.write(test, ase.io.read(shared_data / "ethanol" / "test_MD.xyz", ":300"),
                 format="extxyz")
    env = {**os.environ, "BAYESAL_PROGRESS_SECONDS": "0"}
    exe = str(Path(sys.executable).with_name("bayesal"))
    with open(tmp_path / "stderr.txt", "w") as err:
        out = subprocess.run([exe, "evaluate", "--model", str(trained / "m"), "--test",
                              str(test)], env=env, stderr=err, stdout=subprocess.PIPE,
                             text=True, timeout=600)
    log = (tmp_path / "stderr.txt").read_text()
    assert out.returncode == 0, log
    assert "256 of 300 structures" in log and "300 of 300 structures (100 %)" in log, log

    posterior = load_posterior(trained / "m")
    images = ase.io.read(test, ":12")
    whole = posterior.predict(images)
    seen = []
    parts = predict_in_chunks(posterior, images, chunk=5, on_progress=seen.append)
    assert seen == [5, 10, 12]
    for field in ("energy", "energy_var_epi", "energy_var_ale", "forces", "forces_cov_epi"):
        # float32 sums over differently composed batches: equal to ~1e-8 eV/Å
        np.testing.assert_allclose(getattr(parts, field), getattr(whole, field), rtol=1e-5,
                                   atol=1e-6)


def _energy_only(frames, path):
    """Frames written with their energies and no forces (a scan or a path as codes write
    them)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    out = []
    for a in frames:
        b = a.copy()
        b.calc = SinglePointCalculator(b, energy=a.get_potential_energy())
        out.append(b)
    ase.io.write(path, out, format="extxyz")
    assert "forces" not in path.read_text().splitlines()[1]
    return path


def test_evaluate_energy_only_files_and_several_after_one_flag(trained, shared_data, tmp_path):
    """A file with energies alone (a bond-stretch curve here: ethanol's O-H pulled out) gets
    energy and profile metrics and no force metrics; a file with forces gets both; several
    files follow one --test."""
    frames = ase.io.read(shared_data / "ethanol" / "test_MD.xyz", ":6")
    md = tmp_path / "md.xyz"
    ase.io.write(md, frames, format="extxyz")
    scan = _energy_only(frames[:4], tmp_path / "scan.xyz")
    out = tmp_path / "m.json"
    res = runner.invoke(app, ["evaluate", "--model", str(trained / "m"), "--test", str(md),
                              str(scan), "--json", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    metrics = json.loads(out.read_text())
    with_f, only_e = metrics[str(md)], metrics[str(scan)]
    assert {"force_mae", "force_nll", "force_miscal_area", "energy_profile_mae"} <= set(with_f)
    assert not [k for k in only_e if k.startswith("force")], only_e
    for key in ("energy_mae", "energy_nll", "energy_spearman", "energy_profile_mae",
                "energy_range_error", "energy_barrier_error", "energy_miscal_area"):
        assert np.isfinite(only_e[key]), key
    assert only_e["n_structures"] == 4 and with_f["n_structures"] == 6
    assert "-" in res.output  # the table leaves the scan's force rows empty
    res = runner.invoke(app, ["evaluate", "--model", str(trained / "m"), "--test", str(scan),
                              "--recalibrate-on", str(scan)])
    assert res.exit_code == 1 and "recalibration needs structures with forces" in res.output


def test_several_values_after_one_flag_read_like_repeated_flags():
    """`--test a b --ood c d` = `--test a --test b --ood c --ood d`; a one-value option
    after them keeps its value; a stray value where no repeatable flag precedes is still an
    error."""
    from pathlib import Path

    import typer.main

    commands = typer.main.get_command(app).commands
    ctx = commands["evaluate"].make_context("evaluate", [
        "--model", "m", "--test", "a.xyz", "b.xyz", "--ood", "c.xyz", "d.xyz", "--json", "j"])
    assert ctx.params["test"] == [Path("a.xyz"), Path("b.xyz")]
    assert ctx.params["ood"] == [Path("c.xyz"), Path("d.xyz")]
    assert ctx.params["json_out"] == Path("j")
    ctx = commands["train"].make_context("train", ["--train", "a", "b", "--out", "o"])
    assert ctx.params["train_files"] == [Path("a"), Path("b")] and ctx.params["out"] == Path("o")
    ctx = commands["score"].make_context("score", ["--model", "m", "--pool", "a", "b",
                                                   "--output", "o"])
    assert ctx.params["pool"] == [Path("a"), Path("b")]
    res = runner.invoke(app, ["evaluate", "--model", "m", "--test", "t", "--json", "j", "stray"])
    assert res.exit_code == 2 and "unexpected extra argument" in " ".join(res.output.split())
