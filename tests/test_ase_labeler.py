"""Labelers beyond PySCF: GFN-xTB through tblite and any ASE calculator (kind ase), run
for real under the same isolation, limits and provenance."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk, molecule
from helpers import displaced_pairs, fd_forces

from bayesal.labelers import AseLabeler, LabelerConfig, LabelerInputError, XTBLabeler

HERE = Path(__file__).parent


@pytest.fixture
def test_calculators(monkeypatch):
    """Workers are fresh interpreters: they find the test calculators on PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)


def rattled(name: str, seed: int = 0):
    atoms = molecule(name)
    atoms.positions += np.random.default_rng(seed).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


@pytest.mark.parametrize("method", ["gfn2-xtb", "gfn1-xtb"])
def test_xtb_labels_equal_a_direct_tblite_call(method):
    from tblite.ase import TBLite

    lab = XTBLabeler(method)
    images = [rattled("H2O"), rattled("CH3CH2OH", 1)]
    for atoms, res in zip(images, lab.label_many(images, workers=2), strict=True):
        assert res.ok, res.error
        direct = atoms.copy()
        direct.calc = TBLite(method=method.upper().replace("XTB", "xTB"), verbosity=0)
        assert abs(res.energy - direct.get_potential_energy()) < 1e-8
        np.testing.assert_allclose(res.forces, direct.get_forces(), atol=1e-8)
    prov = res.provenance
    assert prov["code_version"].startswith("tblite ") and prov["host"]
    assert prov["calculator"] == "tblite.ase.TBLite"
    assert prov["settings"] == lab.settings == LabelerConfig(kind="xtb", method=method).settings


def test_xtb_forces_are_minus_energy_gradient():
    lab = XTBLabeler(parameters={"accuracy": 0.01})
    atoms = rattled("CH3CH2OH", 2)
    ref = lab.label(atoms)
    h = 1e-3
    coords = [(0, 0), (2, 1), (5, 2), (8, 0)]
    res = lab.label_many(displaced_pairs(atoms, coords, h), workers=2)
    for (a, c), fd in zip(coords, fd_forces([r.energy for r in res], h), strict=True):
        assert abs(fd - ref.forces[a, c]) < 1e-3, (a, c, fd, ref.forces[a, c])


def test_xtb_scf_that_does_not_converge_is_scf_failed():
    res = XTBLabeler(parameters={"max_iterations": 2}).label(rattled("CH3CH2OH"))
    assert res.status == "scf_failed" and "not converged" in res.error and res.energy is None


def test_xtb_refuses_an_odd_electron_count_as_a_singlet_before_any_work():
    lab = XTBLabeler(charge=1)  # ethanol+ has 25 electrons: no singlet
    with pytest.raises(LabelerInputError, match=r"frame 1: 25 electrons .* multiplicity 1"):
        lab.label_many([rattled("H2O"), rattled("CH3CH2OH")])  # water+ is refused too
    with pytest.raises(LabelerInputError, match="frame 0: 9 electrons"):
        lab.label_many([rattled("H2O")])
    doublet = XTBLabeler(charge=1, multiplicity=2).label(rattled("CH3CH2OH"))
    assert doublet.ok, doublet.error
    assert doublet.energy != XTBLabeler().label(rattled("CH3CH2OH")).energy


def test_xtb_labels_a_periodic_cell_and_its_images_alike():
    """tblite computes periodic cells: the energy does not change when an atom is moved by a
    lattice vector, and the forces equal -dE/dr across the cell boundary."""
    lab = XTBLabeler("gfn1-xtb", parameters={"accuracy": 0.01})
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    si.positions += np.random.default_rng(3).normal(scale=0.03, size=si.positions.shape)
    shifted = si.copy()
    shifted.positions[0] += si.cell[0] - si.cell[2]
    a, b = lab.label_many([si, shifted])
    assert a.ok and b.ok, (a.error, b.error)
    assert abs(a.energy - b.energy) < 1e-7
    np.testing.assert_allclose(a.forces, b.forces, atol=1e-6)
    h = 1e-3
    plus, minus = si.copy(), si.copy()
    plus.positions[0, 0] += h
    minus.positions[0, 0] -= h
    ep, em = (r.energy for r in lab.label_many([plus, minus]))
    assert abs(-(ep - em) / (2 * h) - a.forces[0, 0]) < 2e-3


def test_settings_hash_holds_the_level_of_theory_not_where_or_how_fast(test_calculators):
    base = AseLabeler("ase_test_calculators.Springs", {"k": 2.0})
    same = AseLabeler("ase_test_calculators.Springs",
                      {"k": 2.0, "directory": "/scratch/x", "nprocs": 8, "verbosity": 3},
                      threads=4, timeout_s=10)
    other = AseLabeler("ase_test_calculators.Springs", {"k": 3.0})
    assert base.settings_hash == same.settings_hash != other.settings_hash
    mine = AseLabeler("ase_test_calculators.Springs", {"k": 2.0, "restart_every": 5},
                      settings_exclude=["restart_every"])
    assert mine.settings_hash == base.settings_hash
    assert XTBLabeler(parameters={"electronic_temperature": 300}).settings_hash == \
        XTBLabeler().settings_hash != XTBLabeler(parameters={"accuracy": 0.1}).settings_hash
    assert XTBLabeler(parameters={"max_iterations": 500}).settings_hash == \
        XTBLabeler().settings_hash
    assert XTBLabeler().settings_hash not in {XTBLabeler("gfn1-xtb").settings_hash,
                                              XTBLabeler(charge=1, multiplicity=2).settings_hash}
    cfg = LabelerConfig(kind="ase", calculator="ase_test_calculators.Springs",
                        parameters={"k": 2.0}, method="toy", basis="none")
    assert cfg.build().settings == cfg.settings
    assert cfg.settings["method"] == "toy" and cfg.settings_hash != base.settings_hash


def test_each_failing_calculation_costs_one_label_and_the_next_runs(test_calculators,
                                                                    tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # calculations run in their own scratch folders, not here
    atoms = rattled("CH3CH2OH")
    cases = {"Raises": ("error", "broken input file"),
             "NotConverged": ("scf_failed", "did not converge"),
             "Hangs": ("timeout", "wall-time limit of 3 s"),
             "Segfaults": ("error", "SIGSEGV"),
             "NaNForces": ("error", "non-finite")}
    good = AseLabeler("ase_test_calculators.WritesFiles", {"k": 2.0}, timeout_s=3)
    for name, (status, text) in cases.items():
        bad = AseLabeler(f"ase_test_calculators.{name}", timeout_s=3)
        res = bad.label(atoms)
        assert res.status == status and text in res.error, (name, res.status, res.error)
        assert res.energy is None and res.provenance["calculator"].endswith(name)
        after = good.label(atoms)
        assert after.ok, (name, after.error)
        d = atoms.positions - atoms.positions.mean(axis=0)
        np.testing.assert_allclose(after.forces, -2.0 * d, atol=1e-12)
        assert abs(after.energy - float((d**2).sum())) < 1e-12
    assert list(tmp_path.iterdir()) == []


def test_emt_labels_a_metal_cell_through_kind_ase():
    from ase.calculators.emt import EMT

    cu = bulk("Cu", cubic=True).repeat(2)
    cu.rattle(0.05, seed=1)
    res = LabelerConfig(kind="ase", calculator="ase.calculators.emt.EMT").build().label(cu)
    ref = cu.copy()
    ref.calc = EMT()
    assert res.ok and abs(res.energy - ref.get_potential_energy()) < 1e-12
    np.testing.assert_allclose(res.forces, ref.get_forces(), atol=1e-12)
    assert res.provenance["code_version"].startswith("ase ")


def _campaign_yaml(tmp_path: Path, labeler: str) -> Path:
    (tmp_path / "pool.xyz").write_text("1\n\nH 0 0 0\n")
    path = tmp_path / "c.yaml"
    path.write_text(f"name: c\ndata: {{pool_files: [pool.xyz]}}\nlabeler: {labeler}\n")
    return path


@pytest.mark.parametrize("labeler, field, text", [
    ("{kind: ase, calculator: ase.calculators.orca.NoSuchORCA}", "labeler.calculator",
     "module ase.calculators.orca has no NoSuchORCA"),
    ("{kind: ase, calculator: not_a_package_here.Calc}", "labeler.calculator",
     "cannot import not_a_package_here"),
    ("{kind: ase, calculator: os.system}", "labeler.calculator",
     "not an ASE calculator class"),
    ("{kind: ase, calculator: ase.calculators.orca.ORCA, command: orca-missing-here}",
     "labeler.command", "program 'orca-missing-here'"),
    ("{kind: ase, calculator: ase.calculators.orca.ORCA}", "labeler.command",
     "ORCA runs an external program and none is configured"),
    ("{kind: ase, calculator: ase.calculators.vasp.Vasp}", "labeler.command",
     "ASE_VASP_COMMAND"),
    ("{kind: ase, calculator: ase.calculators.cp2k.CP2K}", "labeler.command",
     "program 'cp2k.psmp'"),
    ("{kind: xtb, method: gfn3-xtb}", "labeler.method", "unknown xTB method"),
    ("{kind: xtb, dispersion: d3bj}", "labeler", "dispersion applies to kind pyscf only"),
])
def test_a_campaign_yaml_with_a_bad_labeler_fails_at_validation_naming_the_field(
        tmp_path, monkeypatch, labeler, field, text):
    from bayesal.flows.campaign_config import load_campaign_config

    for var in ("ASE_VASP_COMMAND", "VASP_COMMAND", "VASP_SCRIPT", "ASE_CP2K_COMMAND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ASE_CONFIG_PATH", str(tmp_path / "no-ase-config.ini"))
    import ase.config

    monkeypatch.setattr(ase.config, "cfg", ase.config.Config())
    monkeypatch.setattr("ase.calculators.genericfileio.GenericFileIOCalculator.cfg",
                        ase.config.cfg)
    with pytest.raises(Exception) as info:
        load_campaign_config(_campaign_yaml(tmp_path, labeler))
    message = str(info.value)
    assert f"{field}:" in message and text in message, message


def test_a_program_on_path_or_in_ase_configuration_passes_validation(tmp_path, monkeypatch):
    """The lookup is the calculator's own: labeler.command, ASE's configuration file or
    the calculator's environment variable; a program found there passes."""
    fake = tmp_path / "bin" / "orca"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    cfg = LabelerConfig(kind="ase", calculator="ase.calculators.orca.ORCA", command="orca",
                        parameters={"orcasimpleinput": "HF STO-3G EnGrad"}, method="hf",
                        basis="sto-3g")
    assert cfg.settings["parameters"] == {"orcasimpleinput": "HF STO-3G EnGrad"}
    import ase.config
    from ase.calculators.orca import ORCA
    from ase.calculators.vasp import Vasp

    from bayesal.labelers.ase_labeler import command_problem, configured_command

    config = ase.config.Config()
    config.parser.read_string(f"[orca]\ncommand = {fake} \n")
    monkeypatch.setattr("ase.config.cfg", config)
    assert configured_command(ORCA)[0].strip() == str(fake)
    assert command_problem(ORCA, None) is None
    monkeypatch.setattr("ase.config.cfg", ase.config.Config())
    with pytest.warns(Warning, match="ASE_VASP_COMMAND"):  # ASE prefers its config file
        monkeypatch.setenv("ASE_VASP_COMMAND", f"env OMP_NUM_THREADS=1 {fake} -n 4")
        assert command_problem(Vasp, None) is None
        monkeypatch.setenv("ASE_VASP_COMMAND", "vasp_std_missing_here -n 4")
        problem = command_problem(Vasp, None)
    assert problem.startswith("program 'vasp_std_missing_here' (command 'vasp_std_missing_here "
                              "-n 4', from environment variable ASE_VASP_COMMAND) is not found")


def test_a_labeler_whose_worker_cannot_start_records_an_error(test_calculators):
    lab = AseLabeler("ase_test_calculators.Springs")
    lab.calculator_class = type("Gone", (), {"__module__": "no_such_module_anywhere"})
    res = lab.label(rattled("H2O"))
    assert res.status == "error" and "worker failed to start" in res.error


def test_two_levels_of_theory_coexist_and_export_picks_one(db_url, tmp_path):
    """xTB labels of the same structures under two methods: both kept (one label per
    structure and settings hash); export by hash prefix or `latest`; label_levels lists
    both; a third run labels nothing again."""
    import ase.io
    from sqlalchemy import text
    from typer.testing import CliRunner

    from bayesal.cli import app
    from bayesal.db import make_engine

    images = [rattled("H2O", k) for k in range(3)]
    ase.io.write(tmp_path / "w.xyz", images)
    run = CliRunner()

    def bayesal(*args: str):
        res = run.invoke(app, ["--database-url", db_url, *args], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res

    for method in ("gfn2-xtb", "gfn1-xtb"):
        bayesal("label", "--input", str(tmp_path / "w.xyz"), "--output",
                str(tmp_path / f"{method}.xyz"), "--kind", "xtb", "--method", method,
                "--campaign", "c")
    again = bayesal("label", "--input", str(tmp_path / "w.xyz"), "--output",
                    str(tmp_path / "again.xyz"), "--kind", "xtb", "--campaign", "c")
    assert "3 of 3 structures already labelled" in again.output
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            levels = conn.execute(text(
                "SELECT method, settings_hash, n_ok, n_failed FROM label_levels "
                "WHERE campaign = 'c' ORDER BY method")).all()
            n_labels = conn.execute(text("SELECT COUNT(*) FROM labels")).scalar()
    finally:
        engine.dispose()
    assert [(m, ok, bad) for m, _, ok, bad in levels] == [("gfn1-xtb", 3, 0),
                                                          ("gfn2-xtb", 3, 0)]
    assert n_labels == 6
    hashes = {m: h for m, h, _, _ in levels}
    assert hashes["gfn2-xtb"] == XTBLabeler("gfn2-xtb").settings_hash

    res = run.invoke(app, ["--database-url", db_url, "export", "--campaign", "c",
                           "--output", str(tmp_path / "x.xyz")])
    assert res.exit_code == 1 and "2 levels of theory" in res.output
    for choice, method in (("latest", "gfn1-xtb"), (hashes["gfn2-xtb"][:12], "gfn2-xtb")):
        bayesal("export", "--campaign", "c", "--output", str(tmp_path / "x.xyz"),
                "--labeler-settings", choice)
        exported = ase.io.read(tmp_path / "x.xyz", ":")
        labelled = ase.io.read(tmp_path / f"{method}.xyz", ":")
        assert sorted(a.info["REF_energy"] for a in exported) == pytest.approx(
            sorted(a.info["REF_energy"] for a in labelled), abs=1e-9)
