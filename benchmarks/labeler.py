"""Benchmark: the PySCF labeler at the acac reference level (PBE-D3(BJ)/def2-SVP).

All in one run, on the shared acetylacetone frames (ORCA references):

1. plain PySCF defaults (no density fitting, minao guess) vs bayesal's defaults (density
   fitting): seconds and SCF cycles per label, force MAE and energy-offset spread vs ORCA;
2. initial-guess reuse on MD neighbours: snapshots of a short ab initio MD trajectory of
   acac (HF/STO-3G forces, 0.5 fs steps, 300 K, generated here) taken 1 fs and 5 fs apart,
   labelled at the reference level cold and with reuse: cycles and seconds per label, and how
   far warm labels differ from cold ones; plus reuse along real data-set frames ordered as a
   nearest-neighbour chain, with force MAE vs ORCA;
3. throughput with 1 worker x 2 threads vs 2 workers x 1 thread.

    python benchmarks/labeler.py            # about 25 minutes on 2 cores
    python benchmarks/labeler.py -n 2       # quicker, noisier
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time

import ase.io
import numpy as np
from _common import shared_data
from ase import units
from ase.calculators.calculator import Calculator, all_changes
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

from bayesal.labelers import PySCFLabeler
from bayesal.labelers.guess_store import kabsch

LEVEL = {"method": "pbe", "basis": "def2-svp", "dispersion": "d3bj"}


def run(labeler: PySCFLabeler, images, workers: int = 1):
    t0 = time.perf_counter()
    results = labeler.label_many(images, workers=workers)
    wall = time.perf_counter() - t0
    bad = [r.error for r in results if not r.ok]
    if bad:
        sys.exit(f"labels failed: {bad}")
    return results, wall


def vs_reference(results, frames) -> tuple[float, float]:
    """Force MAE (eV/Å) and spread (std) of the energy offset (eV) against ORCA."""
    mae = float(np.mean([np.abs(r.forces - f.get_forces()).mean()
                         for r, f in zip(results, frames, strict=True)]))
    offsets = [r.energy - f.get_potential_energy() for r, f in zip(results, frames, strict=True)]
    return mae, float(np.std(offsets))


class _HFSTO3G(Calculator):
    """Cheap ab initio forces (HF/STO-3G, in process) to drive a short MD trajectory."""

    implemented_properties = ("energy", "forces")

    def __init__(self) -> None:
        super().__init__()
        self._dm = None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        from pyscf import gto, scf
        from pyscf.data import nist

        super().calculate(atoms, properties, system_changes)
        mol = gto.M(atom=list(zip(self.atoms.get_chemical_symbols(),
                                  self.atoms.positions.tolist(), strict=True)),
                    basis="sto-3g", unit="Angstrom", verbose=0)
        mf = scf.RHF(mol).density_fit()
        energy = mf.kernel(dm0=self._dm)
        self._dm = mf.make_rdm1()
        grad = mf.nuc_grad_method().kernel()
        self.results = {"energy": energy * nist.HARTREE2EV,
                        "forces": -grad * nist.HARTREE2EV / nist.BOHR}


def md_trajectory(start, n_steps: int, seed: int = 0):
    """Velocity-Verlet MD (0.5 fs) from ``start`` at 300 K; returns every frame."""
    atoms = start.copy()
    atoms.calc = _HFSTO3G()
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(seed))
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    frames = [atoms.copy()]
    for _ in range(n_steps):
        dyn.run(1)
        frames.append(atoms.copy())
    return frames


def nn_chain(frames):
    """Order frames greedily so that each is the nearest (after rotation) to the previous."""
    order, left = [0], set(range(1, len(frames)))
    while left:
        last = frames[order[-1]].positions
        nxt = min(left, key=lambda j: kabsch(last, frames[j].positions)[1])
        order.append(nxt)
        left.remove(nxt)
    return [frames[i] for i in order]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=4, help="frames per comparison")
    ap.add_argument("--chain", type=int, default=5, help="labels per MD spacing")
    args = ap.parse_args()
    data = shared_data()
    frames = ase.io.read(data / "acac" / "train_300K.xyz", f":{args.n}")
    rows = []

    # 1. plain PySCF defaults vs bayesal defaults
    plain, t_plain = run(PySCFLabeler(**LEVEL, density_fit=False, threads=2), frames)
    ours, t_ours = run(PySCFLabeler(**LEVEL, threads=2), frames)
    for name, res, wall in (("plain PySCF (no DF)", plain, t_plain),
                            ("bayesal defaults (DF)", ours, t_ours)):
        mae, spread = vs_reference(res, frames)
        rows.append((name, wall / len(res), np.mean([r.n_scf_cycles for r in res]),
                     mae * 1e3, spread * 1e3))
    print(f"\n1. {args.n} acac frames, {LEVEL['method'].upper()}-D3(BJ)/def2-SVP, "
          "1 worker x 2 threads")
    print(f"{'':<24}{'s/label':>9}{'cycles':>8}{'F MAE meV/Å':>13}{'E offset std meV':>18}")
    for name, s, c, mae, sp in rows:
        print(f"{name:<24}{s:>9.1f}{c:>8.1f}{mae:>13.2f}{sp:>18.2f}")
    print(f"speed-up of bayesal defaults: {rows[0][1] / rows[1][1]:.2f}x")

    # 2. guess reuse along MD
    traj = md_trajectory(frames[0], 10 * args.chain)
    print(f"\n2a. guess reuse on MD snapshots (HF/STO-3G ab initio MD, 0.5 fs steps), "
          f"{args.chain} labels per spacing")
    print(f"{'spacing':<9}{'step RMSD Å':>12}{'cycles cold':>12}{'warm':>6}{'ratio':>7}"
          f"{'s cold':>8}{'warm':>6}{'ratio':>7}{'max|ΔF| meV/Å':>15}")
    for every in (2, 10):  # 1 fs and 5 fs apart
        chain = traj[: every * args.chain + 1 : every]
        steps = [kabsch(a.positions, b.positions)[1] for a, b in itertools.pairwise(chain)]
        with tempfile.TemporaryDirectory() as tmp:
            warm_lab = PySCFLabeler(**LEVEL, threads=2, guess_dir=tmp)
            run(warm_lab, chain[:1])  # seed the store with the chain's start
            cold, t_cold = run(PySCFLabeler(**LEVEL, threads=2), chain[1:])
            warm, t_warm = run(warm_lab, chain[1:])
        c_cold = np.mean([r.n_scf_cycles for r in cold])
        c_warm = np.mean([r.n_scf_cycles for r in warm])
        d_f = max(np.abs(a.forces - b.forces).max() for a, b in zip(cold, warm, strict=True))
        print(f"{every / 2:>5.1f} fs {np.mean(steps):>12.3f}{c_cold:>12.1f}{c_warm:>6.1f}"
              f"{c_cold / c_warm:>7.2f}{t_cold / len(cold):>8.1f}{t_warm / len(warm):>6.1f}"
              f"{t_cold / t_warm:>7.2f}{d_f * 1e3:>15.3f}")

    pool = ase.io.read(data / "acac" / "train_300K.xyz", ":40")
    ordered = nn_chain(pool)[: args.n + 1]
    rmsd = [kabsch(a.positions, b.positions)[1] for a, b in itertools.pairwise(ordered)]
    with tempfile.TemporaryDirectory() as tmp:
        lab = PySCFLabeler(**LEVEL, threads=2, guess_dir=tmp)
        res, _ = run(lab, ordered)
    mae, _ = vs_reference(res[1:], ordered[1:])
    cycles = np.mean([r.n_scf_cycles for r in res[1:]])
    print(f"2b. reuse along real frames (nearest-neighbour chain, RMSD {np.mean(rmsd):.2f} Å): "
          f"{cycles:.1f} cycles/label (cold above: {rows[1][2]:.1f}), force MAE vs ORCA "
          f"{mae * 1e3:.2f} meV/Å")

    # 3. parallel throughput
    _, t1 = run(PySCFLabeler(**LEVEL, threads=2), frames, workers=1)
    _, t2 = run(PySCFLabeler(**LEVEL, threads=1), frames, workers=2)
    print(f"\n3. throughput on {args.n} labels: 1 worker x 2 threads {60 * args.n / t1:.2f} "
          f"labels/min, 2 workers x 1 thread {60 * args.n / t2:.2f} labels/min "
          f"(ratio {t1 / t2:.2f})")


if __name__ == "__main__":
    main()
