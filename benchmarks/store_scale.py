"""Benchmark: does the store stay linear as a campaign grows? Import and re-import rates at
several sizes, SQLite and PostgreSQL (issue 25).

For each backend and size N, in a fresh database: N labelled structures (acac/ethanol frames
of the packaged reference data, each rattled so every one has its own hash; generated
lazily, so 1,000,000 fit in memory) are imported through bayesal's bulk path
(`db.importer.import_atoms`: validation, hashing, INSERT ... ON CONFLICT in batches, labels,
one transaction), then imported again (every structure a duplicate). Prints structures/s of
both and the *growth ratio*: the rate at the smallest size over the rate at this size (1.0:
linear; the issue's target is <= 1.5 at 1,000,000). PostgreSQL runs a private durable server
(Debian's binaries, default settings: fsync on).

Results go to --out (JSON) as each (backend, size) finishes; a rerun skips those already
there, so the 1,000,000 step can run in a later session. Absolute rates depend on the
machine's load; the ratios are what to compare (each run prints the load average).

    python benchmarks/store_scale.py --sizes 10000 100000
    python benchmarks/store_scale.py --sizes 10000 100000 1000000 --backends postgresql
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import ase.io
import numpy as np
from _common import REPO, shared_data
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from bayesal.db import make_engine, upgrade
from bayesal.db.importer import ReferenceLevel, import_atoms

sys.path.insert(0, str(REPO / "tests"))  # the throwaway PostgreSQL server of the tests
from pg_server import TemporaryPostgres, create_database


def structures(n: int, seed: int = 0) -> Iterator:
    """``n`` distinct labelled structures, made one at a time."""
    data = shared_data()
    base = ase.io.read(data / "ethanol" / "train.xyz", ":") + ase.io.read(
        data / "acac" / "train_300K.xyz", ":")
    labels = [(a.get_potential_energy(), a.get_forces()) for a in base]  # read once
    rng = np.random.default_rng(seed)
    for k in range(n):
        ref = base[k % len(base)]
        atoms = Atoms(numbers=ref.numbers, positions=ref.positions
                      + rng.normal(scale=0.01, size=ref.positions.shape))
        energy, forces = labels[k % len(base)]
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        yield atoms


def measure(url: str, n: int) -> dict:
    engine = make_engine(url)
    upgrade(engine)
    level = ReferenceLevel("pbe", "def2-svp")
    t0 = time.perf_counter()
    first = import_atoms(engine, structures(n), "scale", labelled=True, level=level)
    t1 = time.perf_counter()
    again = import_atoms(engine, structures(n), "scale", labelled=True, level=level)
    t2 = time.perf_counter()
    engine.dispose()
    assert first.n_structures_new == n and again.n_structures_new == 0, (first, again)
    return {"import_rate": n / (t1 - t0), "reimport_rate": n / (t2 - t1),
            "import_s": t1 - t0, "reimport_s": t2 - t1, "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    ap.add_argument("--out", type=Path, default=REPO / "artifacts" / "store_scale.json")
    args = ap.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            todo = [n for n in args.sizes if f"{backend}/{n}" not in results]
            if not todo:
                continue
            pg = TemporaryPostgres(durable=True).start() if backend == "postgresql" else None
            try:
                for n in todo:
                    url = (create_database(pg.url) if pg is not None
                           else f"sqlite:///{tmp}/scale-{n}.db")
                    print(f"{backend}: {n:,} structures ...", flush=True)
                    results[f"{backend}/{n}"] = measure(url, n)
                    save()
            finally:
                if pg is not None:
                    pg.stop()

    print(f"\n{'backend':<11} {'N':>10} {'import/s':>10} {'growth':>7} {'re-import/s':>12} "
          f"{'growth':>7} {'load':>5}")
    for backend in args.backends:
        sizes = sorted(int(k.split("/")[1]) for k in results if k.startswith(backend + "/"))
        if not sizes:
            continue
        ref = results[f"{backend}/{sizes[0]}"]
        for n in sizes:
            r = results[f"{backend}/{n}"]
            print(f"{backend:<11} {n:>10,} {r['import_rate']:>10,.0f} "
                  f"{ref['import_rate'] / r['import_rate']:>7.2f} {r['reimport_rate']:>12,.0f} "
                  f"{ref['reimport_rate'] / r['reimport_rate']:>7.2f} {r['load']:>5.1f}")
    print("\ngrowth: rate at the smallest size / rate at this size (1.0 = linear; target <= 1.5 "
          "at 1,000,000). One transaction per import; re-import: every structure a duplicate.")


if __name__ == "__main__":
    main()
