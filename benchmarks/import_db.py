"""Benchmark: importing structures into the database (SQLite and PostgreSQL).

Builds N structures by rattling the shared ethanol and acetylacetone frames (so every one
has its own hash), then measures in the same run, per backend:

* ``store``      — bayesal's bulk path (`db.importer.import_atoms`: validation, hashing,
                   INSERT ... ON CONFLICT in batches, one transaction), labels included;
* ``file``       — the whole `bayesal import` path from an extxyz file (ASE parsing included);
* ``baseline``   — the naive ORM way: one `session.add` + commit per structure, on a subset;

and prints structures/s, the ratio to the baseline, and the peak memory of each phase
(tracemalloc, Python allocations). Run:

    python benchmarks/import_db.py            # 20,000 structures, SQLite + PostgreSQL
    python benchmarks/import_db.py -n 5000 --backends sqlite
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import ase.io
import numpy as np
from _common import REPO, shared_data
from ase.calculators.singlepoint import SinglePointCalculator

from bayesal.db import (
    Campaign,
    Label,
    LabelerSettings,
    Structure,
    make_engine,
    session_scope,
    upgrade,
)
from bayesal.db.identity import atoms_hash, pbc_string
from bayesal.db.importer import ReferenceLevel, import_atoms, import_files

sys.path.insert(0, str(REPO / "tests"))  # the throwaway PostgreSQL server of the tests
from pg_server import TemporaryPostgres, create_database


def make_structures(n: int, seed: int = 0):
    data = shared_data()
    base = ase.io.read(data / "ethanol" / "train.xyz", ":") + ase.io.read(
        data / "acac" / "train_300K.xyz", ":")
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        ref = base[k % len(base)]
        energy, forces = ref.get_potential_energy(), ref.get_forces()
        atoms = ref.copy()
        atoms.positions += rng.normal(scale=0.01, size=atoms.positions.shape)
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        out.append(atoms)
    return out


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def peak_mb(fn) -> float:
    """Peak Python memory of ``fn`` (tracemalloc; a separate, untimed run: it slows code)."""
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def baseline(url: str, images) -> float:
    """Naive ORM: one object and one commit per structure (what bulk inserts replace)."""
    engine = make_engine(url)
    upgrade(engine)
    with session_scope(engine) as s:
        camp = Campaign(name="naive")
        s.add(camp)
        s.add(LabelerSettings(settings_hash="x", labeler="reference", settings={}))
    t0 = time.perf_counter()
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        for atoms in images:
            st = Structure(campaign_id=camp.id, hash=atoms_hash(atoms), numbers=atoms.numbers,
                           positions=atoms.positions, cell=atoms.cell.array,
                           pbc=pbc_string(atoms.pbc), n_atoms=len(atoms),
                           formula=atoms.get_chemical_formula("hill"), source="pool", info={})
            s.add(st)
            s.flush()
            s.add(Label(structure_id=st.id, settings_hash="x", labeler="reference",
                        status="ok", energy=atoms.calc.results["energy"],
                        forces=atoms.calc.results["forces"], provenance={}))
            s.commit()
    dt = time.perf_counter() - t0
    engine.dispose()
    return len(images) / dt


def run_backend(name: str, url_factory, images, xyz: Path, n_baseline: int) -> dict:
    level = ReferenceLevel("pbe", "def2-svp")

    def store(url):
        engine = make_engine(url)
        upgrade(engine)
        report = import_atoms(engine, images, "bench", labelled=True, level=level)
        assert report.n_structures_new == len(images), report
        engine.dispose()

    def from_file(url):
        engine = make_engine(url)
        upgrade(engine)
        report = import_files(engine, [xyz], "bench", labelled=True, level=level)
        assert report.n_structures_new == len(images), report
        engine.dispose()

    urls = [url_factory() for _ in range(4)]
    _, dt_store = timed(lambda: store(urls[0]))
    _, dt_file = timed(lambda: from_file(urls[1]))
    base_rate = baseline(urls[2], images[:n_baseline])
    mem = peak_mb(lambda: store(urls[3]))
    return {
        "backend": name, "n": len(images), "store_rate": len(images) / dt_store,
        "file_rate": len(images) / dt_file, "baseline_rate": base_rate, "peak_mb": mem,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20_000, help="structures to import")
    ap.add_argument("--baseline", type=int, default=1000,
                    help="structures for the one-commit-per-row baseline")
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    args = ap.parse_args()

    images = make_structures(args.n)
    n_atoms = sum(len(a) for a in images)
    print(f"{args.n} structures ({n_atoms / args.n:.1f} atoms on average), rattled from the "
          "shared ethanol + acac frames")
    with tempfile.TemporaryDirectory() as tmp:
        xyz = Path(tmp) / "bench.xyz"
        ase.io.write(xyz, images, format="extxyz")
        results = []
        if "sqlite" in args.backends:
            counter = iter(range(100))
            results.append(run_backend(
                "sqlite", lambda: f"sqlite:///{tmp}/b{next(counter)}.db", images, xyz,
                args.baseline))
        if "postgresql" in args.backends:
            with TemporaryPostgres(durable=True) as pg:
                results.append(run_backend(
                    "postgresql", lambda: create_database(pg.url), images, xyz, args.baseline))

    print()
    print(f"{'backend':<11} {'bulk store/s':>13} {'x baseline':>11} {'file import/s':>14} "
          f"{'baseline/s':>11} {'peak MB':>8}")
    for r in results:
        print(f"{r['backend']:<11} {r['store_rate']:>13,.0f} "
              f"{r['store_rate'] / r['baseline_rate']:>11.1f} {r['file_rate']:>14,.0f} "
              f"{r['baseline_rate']:>11,.0f} {r['peak_mb']:>8.1f}")
    print("\nbulk store: validation + hashing + INSERT ... ON CONFLICT batches (labels too), "
          "one transaction;\nfile import: the same plus ASE extxyz parsing; baseline: one ORM "
          f"add + commit per structure ({args.baseline} structures);\npeak MB: Python "
          "allocations of the bulk store (tracemalloc, separate run), input Atoms excluded.")


if __name__ == "__main__":
    main()
