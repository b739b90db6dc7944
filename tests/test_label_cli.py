"""`bayesal label` end to end: real PySCF (HF/STO-3G), output files, campaign storage."""

from __future__ import annotations

import ase.io
import pytest
from ase.build import molecule
from typer.testing import CliRunner

from bayesal.cli import app

runner = CliRunner()


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "in.xyz"
    images = [molecule("H2O"), molecule("NH3"), molecule("CH4")]
    images[1].positions[0, 0] += 0.05
    ase.io.write(path, images, format="extxyz")
    return path


def bayesal(url, *args):
    return runner.invoke(app, ["--database-url", url, *args], catch_exceptions=False)


def test_label_writes_outputs_and_stores_each_label(db_url, small, tmp_path, monkeypatch):
    monkeypatch.setenv("BAYESAL_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "out.xyz"
    args = ["label", "--input", str(small), "--output", str(out), "--method", "hf",
            "--basis", "sto-3g", "--workers", "2", "--campaign", "c1"]
    res = bayesal(db_url, *args)
    assert res.exit_code == 0, res.output
    back = ase.io.read(out, ":")
    assert [a.get_chemical_formula() for a in back] == ["H2O", "H3N", "CH4"]
    assert all(a.info["REF_energy"] < 0 and a.arrays["REF_forces"].shape == (len(a), 3)
               for a in back)
    assert not (tmp_path / "out.failed.xyz").exists()
    q = bayesal(db_url, "sql", "--csv",
                "SELECT COUNT(*) AS n FROM labelled_data WHERE method = 'hf'")
    assert q.output.splitlines()[1] == "3"
    assert (tmp_path / "data" / "scf-guesses").is_dir()  # guesses kept for reuse

    again = bayesal(db_url, *args)
    assert "3 of 3 structures already labelled" in again.output
    assert "mean" not in again.output  # no "computed N labels, mean ..." line
    assert [a.info["REF_energy"] for a in ase.io.read(out, ":")] == \
           [a.info["REF_energy"] for a in back]


def test_timeouts_are_recorded_then_retried(sqlite_url, small, tmp_path):
    out = tmp_path / "out.xyz"
    common = ["label", "--input", str(small), "--output", str(out), "--method", "hf",
              "--basis", "sto-3g", "--campaign", "c1"]
    res = bayesal(sqlite_url, *common, "--timeout", "0.01")
    assert res.exit_code == 1 and "timeout" in res.output  # nothing labelled: a failed job
    failed = ase.io.read(tmp_path / "out.failed.xyz", ":")
    assert len(failed) == 3 and failed[0].info["label_status"] == "timeout"
    q = bayesal(sqlite_url, "sql", "--csv", "SELECT status, COUNT(*) FROM labels GROUP BY status")
    assert q.output.splitlines()[1] == "timeout,3"

    res = bayesal(sqlite_url, *common)  # failed labels are recomputed, and replace the failures
    assert res.exit_code == 0
    q = bayesal(sqlite_url, "sql", "--csv", "SELECT status, COUNT(*) FROM labels GROUP BY status")
    assert q.output.splitlines()[1:] == ["ok,3"]
    assert len(ase.io.read(out, ":")) == 3


def test_bad_input_computes_nothing(sqlite_url, tmp_path):
    path = tmp_path / "radical.xyz"
    ase.io.write(path, [molecule("H2O"), molecule("CH3")], format="extxyz")
    out = tmp_path / "out.xyz"
    res = bayesal(sqlite_url, "label", "--input", str(path), "--output", str(out),
                  "--method", "hf", "--basis", "sto-3g", "--campaign", "c")
    assert res.exit_code == 1
    assert f"{path}, frame 1" in res.output and "9 electrons" in res.output
    assert not out.exists()
    text = path.read_text().splitlines()
    text[5] = "three"  # the atom count of frame 1 (H2O takes lines 0-4)
    (tmp_path / "broken.xyz").write_text("\n".join(text) + "\n")
    res = bayesal(sqlite_url, "label", "--input", str(tmp_path / "broken.xyz"), "--output",
                  str(out), "--method", "hf", "--basis", "sto-3g")
    assert res.exit_code == 1 and "broken.xyz, frame 1: cannot parse" in res.output
    assert not out.exists()
    res = bayesal(sqlite_url, "label", "--input", str(path), "--output", str(out),
                  "--method", "hf", "--basis", "sto-3g", "--dispersion", "d5")
    assert res.exit_code == 1 and "d3bj" in res.output
