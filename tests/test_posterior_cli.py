"""`bayesal train --method laplace`, `evaluate --ood --plots`, `score` as users run them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
from typer.testing import CliRunner

from bayesal.cli import app

runner = CliRunner()

CONFIG = """
model: {channels: 4, n_layers: 2, radial_hidden: 8, l_max: 1}
train: {max_epochs: 2, warmup_epochs: 1, batch_size: 8}
posterior:
  swag: {epochs: 2, burn_in_epochs: 0, samples: 3}
"""


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return res


@pytest.fixture(scope="module")
def files(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("posterior-cli")
    frames = ase.io.read(shared_data / "ethanol" / "train.xyz", ":90")
    ase.io.write(root / "train.xyz", frames[:40], format="extxyz")
    ase.io.write(root / "test.xyz", frames[40:60], format="extxyz")
    stretched = []
    for a in frames[60:80]:
        a = a.copy()
        a.positions = a.positions.mean(0) + 1.3 * (a.positions - a.positions.mean(0))
        stretched.append(a)
    ase.io.write(root / "ood.xyz", stretched, format="extxyz")
    pool = [a.copy() for a in frames[60:90]]
    for a in pool:
        a.calc = None
    ase.io.write(root / "pool.xyz", pool, format="extxyz")
    (root / "model.yaml").write_text(CONFIG)
    res = invoke("train", "--train", root / "train.xyz", "--out", root / "laplace",
                 "--method", "laplace", "--config", root / "model.yaml")
    assert res.exit_code == 0, res.output
    return root


def test_train_laplace_writes_posterior_and_calibration(files):
    manifest = json.loads((files / "laplace" / "manifest.json").read_text())
    assert manifest["method"] == "laplace" and len(manifest["members"]) == 1
    assert manifest["posterior"]["file"] == "laplace.pt"
    assert manifest["posterior"]["prior_precision"] > 0
    calib = json.loads((files / "laplace" / "calibration.json").read_text())
    assert calib["energy_scale"] > 0 and calib["force_scale"] > 0


def test_evaluate_reports_calibration_ood_and_plots(files, tmp_path):
    res = invoke("evaluate", "--model", files / "laplace", "--test", files / "test.xyz",
                 "--ood", files / "ood.xyz", "--plots", tmp_path / "plots",
                 "--recalibrate-on", files / "test.xyz", "--json", tmp_path / "m.json")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "m.json").read_text())[str(files / "test.xyz")]
    for key in ("force_miscal_area", "force_miscal_area_recal", "force_ence",
                "force_coverage95", "energy_coverage68_recal", "force_nll_recal",
                "ood_auroc_energy", "ood_auroc_force", "force_spearman"):
        assert np.isfinite(m[key]), key
    assert m["ood_auroc_energy"] > 0.9  # 30 % stretched molecules are far from the data
    # recalibrated on the test file itself: the variance scale makes mean z² = 1
    assert m["force_coverage68_recal"] == pytest.approx(0.68, abs=0.12)
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["test_error_vs_sigma.png", "test_reliability.png"]


def test_score_selects_a_diverse_batch_and_writes_all_scores(files, tmp_path):
    res = invoke("score", "--model", files / "laplace", "--pool", files / "pool.xyz",
                 "--n-select", "5", "--selection", "diverse", "--output",
                 tmp_path / "sel.xyz", "--scores", tmp_path / "scores.csv",
                 "--chunk-size", "8")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert [int(r["index"]) for r in rows] == list(range(30))
    assert {r["source_frame"] for r in rows} == {str(i) for i in range(30)}
    selected = ase.io.read(tmp_path / "sel.xyz", ":")
    assert len(selected) == 5
    assert len({a.info["pool_index"] for a in selected}) == 5
    by_index = {int(r["index"]): float(r["score"]) for r in rows}
    for a in selected:
        assert a.info["score"] == pytest.approx(by_index[a.info["pool_index"]], rel=1e-6)
        assert a.info["acquisition"] == "bald-ef"
    assert selected[0].info["score"] == pytest.approx(max(by_index.values()), rel=1e-6)


def test_score_from_a_database_campaign(files, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    monkeypatch.setenv("BAYESAL_DATABASE_URL", url)
    assert invoke("import", files / "pool.xyz", "--campaign", "c1").exit_code == 0
    res = invoke("score", "--model", files / "laplace", "--pool-campaign", "c1",
                 "--batch-size", "3", "--output", tmp_path / "sel.xyz", "--acquisition",
                 "max-force-std")
    assert res.exit_code == 0, res.output
    selected = ase.io.read(tmp_path / "sel.xyz", ":")
    assert len(selected) == 3 and all("structure_id" in a.info for a in selected)
    res = invoke("score", "--model", files / "laplace", "--pool-campaign", "nope",
                 "--output", tmp_path / "x.xyz")
    assert res.exit_code == 1 and "no campaign named 'nope'" in res.output


def test_method_mismatch_and_bad_options_are_clear_errors(files, tmp_path):
    res = invoke("predict", "--model", files / "laplace", "--input", files / "pool.xyz",
                 "--output", tmp_path / "p.xyz", "--method", "ensemble")
    assert res.exit_code == 1 and "holds a laplace model" in res.output
    res = invoke("score", "--model", files / "laplace", "--pool", files / "pool.xyz",
                 "--output", tmp_path / "s.xyz", "--acquisition", "bald")
    assert res.exit_code == 1 and "--acquisition 'bald'" in res.output
    assert "'bald-ef', 'bald-e'" in res.output and "pydantic" not in res.output
    res = invoke("train", "--train", files / "train.xyz", "--out", tmp_path / "x",
                 "--method", "mcdropout")
    assert res.exit_code == 1 and "--method 'mcdropout' is not known" in res.output


def test_train_swag_from_the_cli(files, tmp_path):
    res = invoke("train", "--train", files / "train.xyz", "--out", tmp_path / "swag",
                 "--method", "swag", "--config", files / "model.yaml")
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "swag" / "manifest.json").read_text())
    assert manifest["method"] == "swag" and manifest["posterior"]["snapshots"] == 2
    res = invoke("predict", "--model", tmp_path / "swag", "--input", files / "pool.xyz",
                 "--output", tmp_path / "p.xyz")
    assert res.exit_code == 0, res.output
    frames = ase.io.read(tmp_path / "p.xyz", ":")
    assert all(a.info["pred_energy_std_epistemic"] > 0 for a in frames)


def _bad_inputs(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Files a user might feed to predict/score/evaluate, and what the error must name."""
    frames = ase.io.read(good, ":3")
    out = {}
    nan = [a.copy() for a in frames]
    nan[1].positions[2, 0] = np.nan
    ase.io.write(folder / "nan.xyz", nan)
    out["nan"] = (folder / "nan.xyz", "frame 1, field 'positions'")
    close = [a.copy() for a in frames]
    close[2].positions[1] = close[2].positions[0] + 0.01
    ase.io.write(folder / "close.xyz", close)
    out["close"] = (folder / "close.xyz", "frame 2, field 'positions'")
    text = good.read_text().splitlines()
    n = int(text[0])
    first_atom_of_frame_1 = n + 4
    broken = [*text[:first_atom_of_frame_1], "Xq" + text[first_atom_of_frame_1][1:],
              *text[first_atom_of_frame_1 + 1: 2 * (n + 2)]]
    (folder / "element.xyz").write_text("\n".join(broken) + "\n")
    out["element"] = (folder / "element.xyz", "frame 1")
    (folder / "empty.xyz").write_text("0\nProperties=species:S:1:pos:R:3\n")
    out["empty"] = (folder / "empty.xyz", "no atoms")
    return out


@pytest.mark.parametrize("kind", ["nan", "close", "element", "empty"])
def test_predict_score_and_ood_check_their_input_and_write_nothing_on_error(files, tmp_path,
                                                                            kind):
    path, where = _bad_inputs(tmp_path, files / "pool.xyz")[kind]
    runs = {
        "predict": ["predict", "--model", files / "laplace", "--input", path,
                    "--output", tmp_path / "p.xyz"],
        "score": ["score", "--model", files / "laplace", "--pool", files / "pool.xyz",
                  "--pool", path, "--output", tmp_path / "s.xyz", "--scores",
                  tmp_path / "s.csv", "--chunk-size", "4"],
        "evaluate": ["evaluate", "--model", files / "laplace", "--test", files / "test.xyz",
                     "--ood", path, "--json", tmp_path / "e.json"],
    }
    for name, args in runs.items():
        res = invoke(*args)
        assert res.exit_code == 1, (name, res.output)
        assert str(path) in res.output and where in res.output, (name, res.output)
        assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".xyz"
                  or p.name in ("p.xyz", "s.xyz")) == []


def test_damaged_models_and_databases_are_one_line_errors(files, tmp_path):
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(files / "laplace", model)
    manifest = json.loads((model / "manifest.json").read_text())
    del manifest["shifts"]  # a hand-edited manifest used to give KeyError: 'shifts'
    (model / "manifest.json").write_text(json.dumps(manifest))
    res = invoke("predict", "--model", model, "--input", files / "pool.xyz", "--output",
                 tmp_path / "p.xyz")
    assert res.exit_code == 1 and "'shifts'" in res.output and "Traceback" not in res.output
    (tmp_path / "text.db").write_text("not a database\n" * 100)
    for url, words in ((f"sqlite:///{tmp_path / 'text.db'}", "not a database"),
                       ("postgresql+nosuchdriver://u@h/db", "driver")):
        res = runner.invoke(app, ["--database-url", url, "status"])
        assert res.exit_code == 1 and words in res.output, res.output
        assert len(res.output.strip().splitlines()) <= 3


def test_a_damaged_training_state_cannot_be_resumed_and_says_so(files, tmp_path):
    from helpers import TINY

    from bayesal.bayes_model.checkpoint import CheckpointError
    from bayesal.bayes_model.ensemble import prepare_data
    from bayesal.bayes_model.model import ModelConfig
    from bayesal.bayes_model.train import STATE_FILE, TrainConfig, build_model, train_model

    frames = ase.io.read(files / "train.xyz", ":12")
    cfg = ModelConfig(**TINY)
    data = prepare_data(frames[:10], frames[10:], cfg)
    model = build_model(cfg, data.species, data.shifts, data.train)
    train_model(model, data.train, data.valid, TrainConfig(max_epochs=1, batch_size=5),
                work_dir=tmp_path)
    state = tmp_path / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # killed mid-copy
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        train_model(model, data.train, data.valid, TrainConfig(max_epochs=2, batch_size=5),
                    work_dir=tmp_path, resume=True)
