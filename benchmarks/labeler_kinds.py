"""Benchmark: labels per second of the built-in labelers, xTB against PySCF.

On ethanol and acetylacetone frames of the reference data (geometries only), one run
labels the same frames with GFN2-xTB (tblite), PySCF HF/STO-3G and PySCF PBE/def2-SVP
through the labelers as campaigns use them (isolated processes, one thread per
calculation), with 1 and then 2 workers, and prints labels per second and the ratio to
HF/STO-3G with the same workers, measured in the same run.

Each (labeler, workers) pair gets at least ``--min-labels`` labels and at most
``--seconds`` of labelling (after one warm-up label that starts the worker processes);
the cheap ones label many more frames than the expensive ones.

    python benchmarks/labeler_kinds.py                 # about 10 minutes on 2 cores
    python benchmarks/labeler_kinds.py --seconds 20    # quicker, noisier
"""

from __future__ import annotations

import argparse
import sys
import time

import ase.io
from _common import shared_data

from bayesal.labelers import LabelerConfig

LABELERS = {
    "GFN2-xTB": {"kind": "xtb"},
    "HF/STO-3G": {"kind": "pyscf", "method": "hf", "basis": "sto-3g"},
    "PBE/def2-SVP": {"kind": "pyscf", "method": "pbe", "basis": "def2-svp"},
}
FRAMES = {"ethanol": "ethanol/train.xyz", "acac": "acac/train_300K.xyz"}


def throughput(labeler, frames, workers: int, seconds: float, min_labels: int) -> tuple:
    """(labels per second, labels, failed) labelling ``frames`` in rounds of ``workers``
    until ``seconds`` have passed and ``min_labels`` are done."""
    labeler.label_many(frames[:workers], workers=workers)  # start the worker processes
    done = failed = 0
    t0 = time.perf_counter()
    k = workers
    while done < min_labels or time.perf_counter() - t0 < seconds:
        batch = [frames[(k + i) % len(frames)] for i in range(workers * 2)]
        k += len(batch)
        results = labeler.label_many(batch, workers=workers)
        done += len(results)
        failed += sum(not r.ok for r in results)
        if time.perf_counter() - t0 > 4 * seconds:
            break
    return done / (time.perf_counter() - t0), done, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0,
                        help="labelling time per labeler and worker count")
    parser.add_argument("--min-labels", type=int, default=4)
    parser.add_argument("--molecules", nargs="+", default=list(FRAMES))
    args = parser.parse_args()
    rows = []
    for molecule in args.molecules:
        frames = ase.io.read(shared_data() / FRAMES[molecule], ":200")
        for f in frames:
            f.calc = None
        for workers in (1, 2):
            rates = {}
            for name, options in LABELERS.items():
                labeler = LabelerConfig(**options, threads=1, timeout_s=600).build()
                rate, n, failed = throughput(labeler, frames, workers, args.seconds,
                                             args.min_labels)
                rates[name] = rate
                rows.append((molecule, name, workers, rate, n, failed))
                print(f"{molecule:8s} {name:13s} {workers} worker(s): {rate:9.3f} labels/s "
                      f"({n} labels, {failed} failed)", flush=True)
            for name, rate in rates.items():
                print(f"  {name:13s} x{rate / rates['HF/STO-3G']:8.3g} HF/STO-3G's rate "
                      f"with {workers} worker(s)", flush=True)
    print("\n| molecule | labeler | workers | labels/s | vs HF/STO-3G | s/label |")
    print("|---|---|---|---|---|---|")
    base = {(m, w): r for m, n, w, r, _, _ in rows if n == "HF/STO-3G"}
    for m, n, w, r, _, _ in rows:
        print(f"| {m} | {n} | {w} | {r:.3f} | {r / base[(m, w)]:.3g}x | {1 / r:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
