"""Benchmark: does the store stay linear as a campaign grows? Import, re-import, export,
`bayesal sql` and dashboard refreshes at several sizes, SQLite and PostgreSQL (issue 25).

For each backend and size N, in a fresh database: N labelled structures (acac/ethanol frames
of the packaged reference data, each rattled so every one has its own hash; generated
lazily, so 1,000,000 fit in memory) are imported through bayesal's bulk path
(`db.importer.import_atoms`: validation, hashing, INSERT ... ON CONFLICT in batches, labels,
one transaction), then imported again (every structure a duplicate). Prints structures/s of
both and the *growth ratio*: the rate at the smallest size over the rate at this size (1.0:
linear; the issue's target is <= 1.5 at 1,000,000). PostgreSQL runs a private durable server
(Debian's binaries, default settings: fsync on).

Then, on the imported campaign: export to extxyz (structures/s), `bayesal sql --csv` of
every label's forces (rows/s and the command's peak RSS against the same query with LIMIT
1000: flat memory means equal), and the database's size per structure.

Dashboard (``--steps dashboard``): a separate campaign of N labels whose 5 rounds scored N
candidates each (5N score rows; tests/dashboard_fixture.build_big, generated in the
database), rendered by the real Streamlit script (streamlit.testing AppTest, every tab) in
a child process: the first render (cold cache), an idle rerun, a rerun after a new label
(invalidated cache) and the child's peak RSS.

Results go to --out (JSON) as each (backend, size, step) finishes; a rerun skips those
already there, so the 1,000,000 step can run in a later session. Absolute rates depend on
the machine's load; the ratios are what to compare (each run prints the load average).

    python benchmarks/store_scale.py --sizes 10000 100000
    python benchmarks/store_scale.py --sizes 10000 100000 1000000 --backends postgresql
    python benchmarks/store_scale.py --sizes 1000000 --steps dashboard
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
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


BAYESAL = str(Path(sys.executable).with_name("bayesal"))


def _peak_rss(cmd: list[str], env: dict) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of ``cmd`` with stdout to /dev/null, measured from a fresh
    parent whose only child it is."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(time.perf_counter() - t, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], env=env, check=True,
                         capture_output=True, text=True)
    wall, rss = out.stdout.split()[-2:]
    return float(wall), float(rss)


def _db_bytes(url: str) -> int:
    engine = make_engine(url)
    try:
        if engine.dialect.name == "sqlite":
            return Path(engine.url.database).stat().st_size
        with engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT pg_database_size(current_database())")
                       .scalar())
    finally:
        engine.dispose()


def measure(url: str, n: int, tmp: str) -> dict:
    from bayesal.db.export import export_campaign

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
    out = {"import_rate": n / (t1 - t0), "reimport_rate": n / (t2 - t1),
           "import_s": t1 - t0, "reimport_s": t2 - t1, "load": os.getloadavg()[0]}
    t0 = time.perf_counter()
    report = export_campaign(url, "scale", Path(tmp) / f"export-{n}.xyz")
    out["export_rate"] = report.n_structures / (time.perf_counter() - t0)
    (Path(tmp) / f"export-{n}.xyz").unlink()
    env = {**os.environ, "BAYESAL_DATABASE_URL": url}
    query = "SELECT id, forces FROM labels"
    wall, rss = _peak_rss([BAYESAL, "sql", "--csv", query], env)
    _, rss_small = _peak_rss([BAYESAL, "sql", "--csv", query + " LIMIT 1000"], env)
    out.update(sql_rate=n / wall, sql_rss_mb=rss, sql_rss_1000_mb=rss_small,
               bytes_per_structure=_db_bytes(url) / n)
    return out


def dashboard_child(url: str) -> None:
    """Render the dashboard script (every tab) on ``url``'s campaign ``big``: the first
    render, an idle rerun, a rerun after a new label; prints JSON with seconds and RSS."""
    import dataclasses

    sys.path.insert(0, str(REPO / "tests"))
    import dashboard_fixture as fx
    from streamlit.testing.v1 import AppTest

    from bayesal.db.ingest import run_transaction, upsert_labels
    from bayesal.db.pool import ids_by_source

    os.environ["BAYESAL_DATABASE_URL"] = url
    sys.argv = ["app", "--campaign", "big", "--refresh", "0"]
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=600)

    def render() -> float:
        t = time.perf_counter()
        at.run()
        assert not at.exception, at.exception
        return time.perf_counter() - t

    out = {"first_s": render(), "idle_s": min(render() for _ in range(3))}
    engine = make_engine(url)
    sid = ids_by_source(engine, "big", fx.StructureSource.POOL)[0]
    changed = []
    for k in range(3):
        record = dataclasses.replace(fx._record(-2002.0), settings_hash=f"{k:064d}",
                                     settings={**fx.SETTINGS, "method": f"m{k}"})
        run_transaction(engine, lambda s, r=record: upsert_labels(s, [(sid, r)]))
        changed.append(render())
    engine.dispose()
    out["new_label_s"] = sorted(changed)[1]  # the median of 3
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def served_rss_mb(url: str) -> float | None:
    """Peak RSS (VmHWM, MB) of a real `bayesal dashboard` server after Chromium opened every
    tab of campaign ``big`` (None without Chromium)."""
    import shutil
    import socket
    import urllib.request

    chromium = shutil.which("chromium")
    if chromium is None:
        return None
    from playwright.sync_api import sync_playwright

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([BAYESAL, "dashboard", "--port", str(port), "--refresh", "0",
                             "--campaign", "big"], env={**os.environ,
                                                        "BAYESAL_DATABASE_URL": url},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}")
            page.get_by_text("Campaign big").wait_for(timeout=300_000)
            for tab in ("Learning curves", "Calibration", "Acquisition", "Labeling", "Data",
                        "Structure", "Overview"):
                page.get_by_role("tab", name=tab).click()
                page.wait_for_timeout(1500)
            browser.close()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def measure_dashboard(url: str, n: int) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    import dashboard_fixture as fx

    engine = make_engine(url)
    upgrade(engine)
    t0 = time.perf_counter()
    fx.build_big(engine, n, 5, n)
    built = time.perf_counter() - t0
    engine.dispose()
    child = subprocess.run([sys.executable, __file__, "--dashboard-child", url],
                           capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(child.stderr[-3000:])
    return {**json.loads(child.stdout.strip().splitlines()[-1]), "build_s": built,
            "scores": 5 * n, "served_rss_mb": served_rss_mb(url), "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    ap.add_argument("--steps", nargs="+", default=["store"], choices=["store", "dashboard"])
    ap.add_argument("--out", type=Path, default=REPO / "artifacts" / "store_scale.json")
    ap.add_argument("--dashboard-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dashboard_child:
        dashboard_child(args.dashboard_child)
        return
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            todo = [(step, n) for step in args.steps for n in args.sizes
                    if _key(backend, n, step) not in results]
            if not todo:
                continue
            pg = TemporaryPostgres(durable=True).start() if backend == "postgresql" else None
            try:
                for step, n in todo:
                    url = (create_database(pg.url) if pg is not None
                           else f"sqlite:///{tmp}/{step}-{n}.db")
                    print(f"{backend}: {step}, {n:,} structures ...", flush=True)
                    work = measure_dashboard if step == "dashboard" else measure
                    results[_key(backend, n, step)] = (work(url, n) if step == "dashboard"
                                                       else work(url, n, tmp))
                    save()
                    if pg is None:
                        Path(f"{tmp}/{step}-{n}.db").unlink()
            finally:
                if pg is not None:
                    pg.stop()

    _report(results, args.backends)


def _key(backend: str, n: int, step: str) -> str:
    return f"{backend}/{n}" if step == "store" else f"{backend}/{n}/{step}"


def _report(results: dict, backends: list[str]) -> None:
    print(f"\n{'backend':<11} {'N':>10} {'import/s':>10} {'growth':>7} {'re-import/s':>12} "
          f"{'growth':>7} {'export/s':>9} {'sql rows/s':>10} {'sql MB':>7} {'(1000)':>7} "
          f"{'B/struct':>8} {'load':>5}")
    for backend in backends:
        sizes = sorted(int(k.split("/")[1]) for k in results
                       if k.startswith(backend + "/") and k.count("/") == 1)
        if not sizes:
            continue
        ref = results[f"{backend}/{sizes[0]}"]
        for n in sizes:
            r = results[f"{backend}/{n}"]
            extra = (f"{r['export_rate']:>9,.0f} {r['sql_rate']:>10,.0f} {r['sql_rss_mb']:>7.0f} "
                     f"{r['sql_rss_1000_mb']:>7.0f} {r['bytes_per_structure']:>8,.0f}"
                     if "export_rate" in r else f"{'-':>9} {'-':>10} {'-':>7} {'-':>7} {'-':>8}")
            print(f"{backend:<11} {n:>10,} {r['import_rate']:>10,.0f} "
                  f"{ref['import_rate'] / r['import_rate']:>7.2f} {r['reimport_rate']:>12,.0f} "
                  f"{ref['reimport_rate'] / r['reimport_rate']:>7.2f} {extra} {r['load']:>5.1f}")
    print("\ngrowth: rate at the smallest size / rate at this size (1.0 = linear; target <= 1.5 "
          "at 1,000,000). One transaction per import; re-import: every structure a duplicate.\n"
          "sql MB: peak RSS of `bayesal sql --csv` of every label's forces; (1000): the same "
          "query with LIMIT 1000 (flat memory: equal).")
    rows = [(k, r) for k, r in results.items() if k.endswith("/dashboard")]
    if rows:
        print(f"\n{'dashboard':<11} {'labels':>10} {'scores':>10} {'first s':>8} {'idle s':>7} "
              f"{'new label s':>11} {'AppTest MB':>10} {'server MB':>9} {'load':>5}")
        for k, r in sorted(rows, key=lambda kr: (kr[0].split("/")[0], int(kr[0].split("/")[1]))):
            backend, n, _ = k.split("/")
            print(f"{backend:<11} {int(n):>10,} {r['scores']:>10,} {r['first_s']:>8.2f} "
                  f"{r['idle_s']:>7.2f} {r['new_label_s']:>11.2f} {r['rss_mb']:>10.0f} "
                  f"{r.get('served_rss_mb') or float('nan'):>9.0f} {r['load']:>5.1f}")
        print("\nfirst: the first render (every tab, cold cache); idle: a rerun with nothing "
              "new; new label: a rerun after a label was added (cache invalidated); AppTest MB: "
              "peak RSS of the process rendering through streamlit.testing (which keeps every "
              "run's messages); server MB: peak RSS of a real `bayesal dashboard` after "
              "Chromium opened every tab. Targets at 1,000,000 labels / 5,000,000 scores: "
              "<= 1.5 s, idle <= 0.2 s, <= 300 MB.")


if __name__ == "__main__":
    main()
