"""Labelers with real PySCF at cheap settings: physics, failures, isolation, bad input."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from helpers import displaced_pairs, fd_forces

from bayesal.labelers import LabelerInputError, PySCFLabeler, ReplayLabeler, XTBLabeler
from bayesal.labelers.isolation import _all as workers
from bayesal.labelers.isolation import run_isolated


def water() -> Atoms:
    return molecule("H2O")


def test_forces_are_minus_energy_gradient():
    """Central finite differences of the labeler's own energies (HF/STO-3G, DF on)."""
    lab = PySCFLabeler("hf", "sto-3g", conv_tol=1e-12)
    atoms = water()
    atoms.positions += np.random.default_rng(0).normal(scale=0.05, size=(3, 3))
    ref = lab.label(atoms)
    assert ref.ok, ref.error
    h = 1e-3
    coords = [(0, 2), (1, 0), (2, 1), (1, 2)]
    res = lab.label_many(displaced_pairs(atoms, coords, h), workers=2)
    assert all(r.ok for r in res)
    for (a, c), fd in zip(coords, fd_forces([r.energy for r in res], h), strict=True):
        assert abs(fd - ref.forces[a, c]) < 2e-4, (a, c, fd, ref.forces[a, c])


def test_energy_units_and_provenance():
    lab = PySCFLabeler("hf", "sto-3g")
    res = lab.label(water())
    assert res.ok and res.forces.shape == (3, 3)
    assert -2080 < res.energy < -2020  # HF/STO-3G water is about -74.96 Hartree = -2039.8 eV
    prov = res.provenance
    assert prov["code"]["pyscf"] and prov["host"] and prov["reference"] == "RHF/RKS"
    assert prov["attempts"][0]["step"] == "diis" and prov["attempts"][-1]["converged"]
    assert res.n_scf_cycles == sum(a["cycles"] for a in prov["attempts"]) > 0
    assert res.wall_s > 0


def test_open_shell_runs_unrestricted():
    oh = Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]])
    res = PySCFLabeler("hf", "sto-3g", multiplicity=2).label(oh)
    assert res.ok and res.provenance["reference"] == "UHF/UKS"
    with pytest.raises(LabelerInputError, match=r"9 electrons .* multiplicity 1"):
        PySCFLabeler("hf", "sto-3g").label(oh)


def test_scf_failure_walks_the_ladder_and_is_never_ok_unconverged():
    stretched = Atoms("N2", positions=[[0, 0, 0], [0, 0, 2.6]])
    lab = PySCFLabeler("pbe", "sto-3g", max_cycle=1, multiplicity=1)
    res = lab.label(stretched)
    attempts = res.provenance["attempts"]
    assert len(attempts) >= 2 and attempts[0]["converged"] is False
    if res.ok:
        assert attempts[-1]["converged"] is True
    else:
        assert res.status == "scf_failed" and res.energy is None and res.forces is None
        assert [a["step"] for a in attempts] == ["diis", "level_shift", "damping", "newton",
                                                 "atom_guess"]
        assert "did not converge" in res.error


def test_ladder_rescues_a_scf_that_diis_cannot_converge():
    # N2 stretched to 3.2 Å with 5 cycles per rung: DIIS, level shift and damping fail,
    # second-order SCF converges. The label is ok and says how it got there.
    res = PySCFLabeler("pbe", "sto-3g", max_cycle=5).label(
        Atoms("N2", positions=[[0, 0, 0], [0, 0, 3.2]]))
    attempts = res.provenance["attempts"]
    assert res.ok, res.error
    assert attempts[0]["step"] == "diis" and not attempts[0]["converged"]
    assert attempts[-1]["converged"] and attempts[-1]["step"] != "diis"
    assert res.n_scf_cycles == sum(a["cycles"] for a in attempts) > 5


def test_gradient_failure_after_converged_scf_is_error():
    lab = PySCFLabeler("hf", "sto-3g")
    lab._fail_gradient = True
    res = lab.label(water())
    assert res.status == "error" and "gradient failed" in res.error and res.energy is None


def test_timeout_then_the_next_calculation_still_runs(shared_data):
    acac = ase.io.read(shared_data / "acac" / "train_300K.xyz", 0)
    slow = PySCFLabeler("pbe", "def2-svp", dispersion="d3bj", timeout_s=1.0)
    t0 = time.perf_counter()
    res = slow.label(acac)
    assert res.status == "timeout" and "wall-time limit" in res.error
    assert time.perf_counter() - t0 < 15
    assert PySCFLabeler("hf", "sto-3g").label(water()).ok


def test_calculations_leave_no_scratch_files_even_when_killed(tmp_path, monkeypatch):
    """PySCF keeps checkpoint/integral files in TMPDIR; a calculation killed at its time
    limit (or ending with os._exit) used to leave them there forever."""
    from bayesal.labelers.isolation import shutdown_workers

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    shutdown_workers()  # workers read TMPDIR when they start
    monkeypatch.setenv("TMPDIR", str(scratch))
    try:
        slow = PySCFLabeler("hf", "def2-svp", density_fit=False, timeout_s=1.0)
        assert slow.label(molecule("C6H6")).status == "timeout"
        assert PySCFLabeler("hf", "sto-3g").label(water()).ok
        assert list(scratch.rglob("*")) == []
    finally:
        shutdown_workers()  # later tests get workers with the usual TMPDIR


def test_memory_limit_is_enforced_in_the_calculation_only():
    """max_memory_mb used to be a hint to PySCF only (a 5000-atom structure with 500 MB
    reached 4.9 GB); the calculation process now has a hard address-space ceiling."""
    out = run_isolated("numpy:ones", {"shape": (500_000_000,)}, timeout=60, memory_mb=1500)
    assert out.kind == "exception" and "out of memory" in out.message
    assert "1500 MB" in out.message
    lab = PySCFLabeler("hf", "sto-3g", max_memory_mb=200, threads=2)
    assert lab.memory_limit_mb == 2 * 200 + 1024 + 2 * 128
    assert lab.label(water()).ok  # the ceiling leaves room for a normal calculation


def test_crashing_calculation_costs_only_itself():
    out = run_isolated("ctypes:string_at", {"ptr": 0}, timeout=30)  # segfault in the child
    assert out.kind == "died" and "SIGSEGV" in out.message
    assert PySCFLabeler("hf", "sto-3g").label(water()).ok


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # zombies are gone
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_killed_calculation_process_costs_one_label(shared_data):
    eth = ase.io.read(shared_data / "ethanol" / "train.xyz", ":2")
    lab = PySCFLabeler("pbe", "def2-svp")  # several seconds each

    killed = []

    def killer():
        deadline = time.time() + 30
        while time.time() < deadline and not killed:
            for w in list(workers):
                for child in _children(w.proc.pid):
                    os.kill(child, signal.SIGKILL)
                    killed.append(child)
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=killer)
    thread.start()
    res = lab.label_many(eth, workers=1)
    thread.join()
    assert killed
    assert [r.status for r in res].count("error") == 1
    assert [r.status for r in res].count("ok") == 1
    failed = next(r for r in res if not r.ok)
    assert "SIGKILL" in failed.error


@pytest.mark.parametrize("atoms,needle", [
    (Atoms("H", positions=[[0, 0, 0]]), "cannot have multiplicity 1"),
    (Atoms("Xe", positions=[[0, 0, 0]]), "no functions for Xe"),
    (Atoms("H2", positions=[[0, 0, 0], [0, 0, np.nan]]), "non-finite"),
    (Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.05]]), "apart"),
    (Atoms(), "no atoms"),
    (Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]], cell=[5, 5, 5], pbc=True), "periodic"),
])
def test_bad_input_is_refused_before_any_calculation(atoms, needle):
    lab = PySCFLabeler("hf", "sto-3g")
    seen = []
    with pytest.raises(LabelerInputError) as info:
        lab.label_many([water(), atoms], on_result=lambda i, r: seen.append(i))
    assert seen == []  # nothing was computed, not even the good frame 0
    assert "frame 1" in str(info.value) and needle in str(info.value)


@pytest.mark.parametrize("kwargs,needle", [
    ({"method": "b3lpy"}, "unknown functional 'b3lpy'"),
    ({"basis": "def2-svpp"}, "unknown basis set 'def2-svpp'"),
    ({"dispersion": "d5"}, "d3bj, d3zero"),
    ({"method": "m06", "dispersion": "d3bj"}, "no parameters for 'm06'"),
    ({"multiplicity": 0}, "multiplicity must be >= 1"),
])
def test_unknown_names_list_what_is_accepted(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        PySCFLabeler(**({"method": "hf", "basis": "sto-3g"} | kwargs))


def test_settings_hash_is_the_level_of_theory_only():
    a = PySCFLabeler("pbe", "def2-svp", dispersion="d3bj")
    b = PySCFLabeler("PBE", "def2-SVP", dispersion="d3bj", threads=2, timeout_s=10,
                     guess_dir="/tmp/x")
    assert a.settings_hash == b.settings_hash
    assert a.settings_hash != PySCFLabeler("pbe", "def2-svp").settings_hash
    assert a.settings_hash != PySCFLabeler("pbe", "def2-svp", dispersion="d3bj",
                                           density_fit=False).settings_hash


def test_labelers_imports_and_the_store_share_one_identity_of_structures_and_levels():
    """Structure hash, settings hash, label status and the die-with-parent helper are
    defined once (bayesal.contracts) and are what the labelers, the importer and the store
    use: a replay labeler finds structures by the database's hash, and labels imported with
    a level of theory carry the hash of that level's settings."""
    from bayesal import contracts
    from bayesal.bayes_model import ensemble
    from bayesal.db import identity, importer, ingest, models
    from bayesal.labelers import _worker, base, replay

    assert replay.atoms_hash is identity.atoms_hash is contracts.atoms_hash
    assert base.settings_hash is ingest.settings_hash is importer.settings_hash \
        is contracts.settings_hash
    assert base.LabelStatus is models.LabelStatus is contracts.LabelStatus
    assert _worker.die_with_parent is ensemble.die_with_parent is contracts.die_with_parent
    level = importer.ReferenceLevel("PBE", "def2-SVP")
    assert level.settings_hash == contracts.settings_hash(
        {"labeler": "reference", "method": "pbe", "basis": "def2-svp"})
    labeler = PySCFLabeler("hf", "sto-3g")
    assert labeler.settings_hash == contracts.settings_hash(labeler.settings)


@pytest.mark.parametrize("fields", [
    {}, {"method": "HF", "basis": "STO-3G"},
    {"method": "pbe", "dispersion": "d3bj", "charge": 1, "multiplicity": 2, "grid_level": 4},
    {"method": "b3lyp", "density_fit": False, "threads": 4, "timeout_s": 5},
])
def test_a_labeler_config_knows_its_settings_hash_without_building_the_labeler(fields):
    """The campaign computes the hash from its YAML section; the labeler it builds stores
    labels under it. Both must agree for every level of theory."""
    from bayesal.labelers import LabelerConfig

    cfg = LabelerConfig(**fields)
    labeler = cfg.build()
    assert cfg.settings == labeler.settings
    assert cfg.settings_hash == labeler.settings_hash


def test_replay_config_hash_matches_the_replay_labeler(tmp_path):
    from bayesal.labelers import LabelerConfig

    path = tmp_path / "lab.xyz"
    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((2, 3)))
    ase.io.write(path, atoms)
    cfg = LabelerConfig(kind="replay", replay_files=[path], method="pbe", basis="def2-svp")
    first = cfg.settings_hash
    assert first == cfg.build().settings_hash
    atoms.calc = SinglePointCalculator(atoms, energy=-2.0, forces=np.zeros((2, 3)))
    ase.io.write(path, atoms)  # other data, other labels: another hash
    assert cfg.settings_hash != first


def test_library_cli_and_campaign_share_one_set_of_labeler_defaults():
    import inspect

    from bayesal.cli import label as label_cli
    from bayesal.flows.campaign_config import CampaignConfig
    from bayesal.labelers import LabelerConfig

    cfg = LabelerConfig()
    sig = inspect.signature(PySCFLabeler)
    for name in ("method", "basis", "dispersion", "charge", "multiplicity", "density_fit",
                 "grid_level", "threads", "max_memory_mb", "timeout_s", "backend"):
        assert sig.parameters[name].default == getattr(cfg, name), name
    assert CampaignConfig.model_fields["labeler"].default_factory() == cfg
    cli = inspect.signature(label_cli.label).parameters
    assert (cli["timeout"].default, cli["max_memory"].default) == (cfg.timeout_s,
                                                                   cfg.max_memory_mb)
    # method and basis: the CLI leaves them to the kind's defaults, which are the library's
    kind_defaults = LabelerConfig(kind=cli["kind"].default, method=cli["method"].default,
                                  basis=cli["basis"].default)
    assert (kind_defaults.method, kind_defaults.basis) == (cfg.method, cfg.basis)
    assert LabelerConfig(kind="xtb").method == "gfn2-xtb"
    assert inspect.signature(XTBLabeler).parameters["method"].default == "gfn2-xtb"


def test_replay_serves_stored_labels_exactly(shared_data):
    path = shared_data / "ethanol" / "test_MD.xyz"
    ref = ase.io.read(path, ":")
    lab = ReplayLabeler([path], method="pbe", basis="def2-svp")
    assert len(lab) == len(ref)
    for atoms in (ref[0], ref[500], ref[-1]):
        res = lab.label(atoms)
        assert res.ok and res.energy == atoms.get_potential_energy()
        np.testing.assert_array_equal(res.forces, atoms.get_forces())
    other = ref[0].copy()
    other.positions[0, 0] += 0.01
    res = lab.label(other)
    assert res.status == "error" and "not in the replay files" in res.error
    assert lab.settings_hash == ReplayLabeler([path], method="pbe",
                                              basis="def2-svp").settings_hash


def test_killing_the_caller_leaves_no_calculation_running(tmp_path):
    """A campaign process killed with SIGKILL must not leave PySCF runs behind."""
    import subprocess
    import sys

    script = tmp_path / "caller.py"
    script.write_text(
        "import sys, threading, time\n"
        "from ase.build import molecule\n"
        "from bayesal.labelers import PySCFLabeler\n"
        "from bayesal.labelers.isolation import _all\n"
        "lab = PySCFLabeler('pbe', 'def2-tzvp', timeout_s=None)\n"
        "t = threading.Thread(target=lab.label, args=(molecule('C6H6'),), daemon=True)\n"
        "t.start()\n"
        "while not _all: time.sleep(0.05)\n"
        "time.sleep(1.0)\n"
        "print(_all[0].proc.pid, flush=True)\n"
        "t.join()\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    calc = _children(worker)
    assert calc, "the calculation should be running"
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    alive = [worker, *calc]
    while alive and time.time() < deadline:
        alive = [p for p in alive if _running(p)]
        time.sleep(0.1)
    assert alive == []


@pytest.mark.gpu
def test_gpu_backend_agrees_with_cpu():
    from bayesal.labelers import gpu_available

    if not gpu_available():
        pytest.skip("gpu4pyscf is not importable (no GPU backend here)")
    cpu = PySCFLabeler("pbe", "def2-svp").label(water())
    gpu = PySCFLabeler("pbe", "def2-svp", backend="gpu").label(water())
    assert gpu.ok and gpu.provenance["backend"] == "gpu"
    assert abs(gpu.energy - cpu.energy) < 1e-5  # eV
    assert np.abs(gpu.forces - cpu.forces).max() < 1e-4  # eV/Å


def test_child_processes_exit_when_their_parent_is_already_gone():
    """Calculation children (labeler worker) and ensemble members ask to die with their
    parent; one whose parent died before the request (it is orphaned) exits instead of
    working for nobody, and under its live parent it carries on."""
    import subprocess
    import sys

    module, name = "bayesal.contracts", "die_with_parent"  # workers' and members'
    code = (f"import os, sys; from {module} import {name}; "
            f"{name}(os.getppid() + int(sys.argv[1])); print('alive')")
    ok = subprocess.run([sys.executable, "-c", code, "0"], capture_output=True, text=True)
    assert (ok.returncode, ok.stdout.strip()) == (0, "alive")
    orphan = subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True)
    assert (orphan.returncode, orphan.stdout) == (1, "")
