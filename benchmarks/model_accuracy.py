"""Benchmark: accuracy and speed of the ensemble vs NequIP at an equal CPU wall-time budget.

Ethanol (rMD17, PBE/def2-SVP): 950 training / 50 validation frames from the shared
`train.xyz` (fixed random split), evaluated on the 1000 frames of `test_MD.xyz`. In the same
run: our 4-member deep ensemble (members trained two at a time, the whole ensemble within the
budget) and NequIP (its own virtualenv, tutorial settings, one model with the whole budget).
Reports energy/force MAE of both and their ratio, inference throughput (structures/s; ours:
energy + forces + uncertainties of the whole ensemble), and the energy drift of a 1 ps NVE
run of ethanol driven by the ensemble.

    python benchmarks/model_accuracy.py                      # 20 minutes each, ~45 min total
    python benchmarks/model_accuracy.py --minutes 4 --skip-nequip
NequIP's python: --nequip-python or $BAYESAL_NEQUIP_PYTHON (a venv with `pip install
torch==2.13.0 nequip`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import ase.io
import numpy as np
from _common import REPO, shared_data
from ase import units
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from bayes_model.calculator import BayesalCalculator
from bayes_model.config import load_training_file
from bayes_model.ensemble import train_ensemble
from bayes_model.metrics import accuracy_metrics
from bayes_model.posterior import EnsemblePosterior, load_posterior


def split(data: Path):
    frames = ase.io.read(data / "ethanol" / "train.xyz", ":")
    order = np.random.default_rng(0).permutation(len(frames))
    train = [frames[i] for i in order[:950]]
    valid = [frames[i] for i in order[950:1000]]
    test = ase.io.read(data / "ethanol" / "test_MD.xyz", ":")
    return train, valid, test


def nve_drift(posterior, start, picoseconds: float = 1.0, dt_fs: float = 0.5):
    atoms = start.copy()
    atoms.calc = BayesalCalculator(posterior=posterior)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    steps = round(picoseconds * 1000 / dt_fs)
    times, energies = [], []
    for k in range(0, steps + 1, 10):
        if k:
            dyn.run(10)
        times.append(k * dt_fs / 1000)
        energies.append(atoms.get_total_energy())
    slope = np.polyfit(times, energies, 1)[0]  # eV/ps
    return {"drift_eV_per_ps_per_atom": float(slope / len(atoms)),
            "max_deviation_eV": float(np.max(np.abs(np.array(energies) - energies[0]))),
            "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-time budget of each")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--config", default=str(REPO / "benchmarks" / "configs" / "ethanol.yaml"))
    ap.add_argument("--nequip-python", default=os.environ.get("BAYESAL_NEQUIP_PYTHON",
                                                              "/work/venvs/nequip/bin/python"))
    ap.add_argument("--skip-nequip", action="store_true")
    ap.add_argument("--out", default=None, help="keep the trained models here")
    args = ap.parse_args()

    train, valid, test = split(shared_data())
    settings = load_training_file(args.config)
    procs = min(2, args.members)
    waves = -(-args.members // procs)
    train_cfg = settings.train.model_copy(update={"max_minutes": args.minutes / waves})
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.out or Path(tmp) / "model")
        t0 = time.perf_counter()
        train_ensemble(train, valid, model_dir, members=args.members, model_config=settings.model,
                       train_config=train_cfg, processes=procs)
        train_s = time.perf_counter() - t0
        post = load_posterior(model_dir)
        t0 = time.perf_counter()
        pred = post.predict(test)
        infer_s = time.perf_counter() - t0
        ours = accuracy_metrics(pred, test)
        single = EnsemblePosterior(post.models[:1])
        t0 = time.perf_counter()
        single.predict(test)
        single_s = time.perf_counter() - t0
        members = [accuracy_metrics(EnsemblePosterior([m]).predict(test), test)["force_mae"]
                   for m in post.models]
        results["ours"] = {**ours, "train_s": train_s, "structures_per_s": len(test) / infer_s,
                           "member_structures_per_s": len(test) / single_s,
                           "member_force_mae": members,
                           "epochs": [m["epochs"] for m in post.manifest.members]}
        results["nve"] = nve_drift(post, test[0])

        if not args.skip_nequip:
            work = Path(tmp) / "nequip"
            work.mkdir()
            ase.io.write(work / "train.xyz", train, format="extxyz")
            ase.io.write(work / "val.xyz", valid, format="extxyz")
            ase.io.write(work / "test.xyz", test, format="extxyz")
            proc = subprocess.run([args.nequip_python, str(REPO / "benchmarks" /
                                                           "_nequip_driver.py"),
                                   str(work), str(args.minutes), "2"],
                                  capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            results["nequip"] = json.loads(lines[-1]) if lines else {
                "error": proc.stderr[-2000:]}

    o = results["ours"]
    print(f"\nethanol: 950 train / 50 validation, 1000 test_MD frames; budget {args.minutes:g} "
          f"min each on this machine")
    print(f"{'':<34}{'E MAE meV':>10}{'F MAE meV/Å':>13}{'train s':>9}{'structs/s':>11}")
    print(f"{'bayesal ensemble (' + str(args.members) + ' members)':<34}"
          f"{o['energy_mae'] * 1e3:>10.1f}{o['force_mae'] * 1e3:>13.1f}{o['train_s']:>9.0f}"
          f"{o['structures_per_s']:>11.1f}")
    print(f"{'  single member (mean of ' + str(args.members) + ')':<34}{'':>10}"
          f"{np.mean(o['member_force_mae']) * 1e3:>13.1f}{'':>9}"
          f"{o['member_structures_per_s']:>11.1f}")
    n = results.get("nequip")
    if n and "force_mae" in n:
        print(f"{'NequIP (4 layers, l_max 1, 32 ch)':<34}{n['energy_mae'] * 1e3:>10.1f}"
              f"{n['force_mae'] * 1e3:>13.1f}{n['train_s']:>9.0f}{n['structures_per_s']:>11.1f}")
        print(f"force MAE ratio ours/NequIP: {o['force_mae'] / n['force_mae']:.2f}; energy MAE "
              f"ratio: {o['energy_mae'] / n['energy_mae']:.2f}")
    elif n:
        print("NequIP failed:", n.get("error", "")[-500:])
    print(f"NLL (energy, force): {o['energy_nll']:.2f}, {o['force_nll']:.2f}; Spearman "
          f"ρ(|err|, σ) energy {o.get('energy_spearman', float('nan')):.2f}, forces "
          f"{o['force_spearman']:.2f}; epochs per member {o['epochs']}")
    d = results["nve"]
    print(f"NVE 1 ps (0.5 fs steps, ensemble calculator): drift "
          f"{d['drift_eV_per_ps_per_atom'] * 1e3:.3f} meV/ps/atom, max |ΔE_tot| "
          f"{d['max_deviation_eV'] * 1e3:.2f} meV")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
