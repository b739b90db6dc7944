"""Benchmark: the quickstart campaign on PySCF HF/STO-3G labels vs on GFN2-xTB labels.

Runs ``examples/quickstart.yaml`` and ``examples/quickstart-xtb.yaml`` (the same campaign
but for the labeler: 150-structure ethanol pool, 8 initial + 20 test labels, 5 rounds of
train -> score -> select 8 -> label) one after the other as whole ``bayesal run`` commands,
each with its own SQLite file and the same threads, and prints the wall time of each, the
time its labels took (sum of the labels' wall seconds, over the labeler's workers) and the
ratios, all from this run.

    python benchmarks/campaign_labelers.py            # about 6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO

CAMPAIGNS = {"PySCF HF/STO-3G": "quickstart.yaml", "GFN2-xTB": "quickstart-xtb.yaml"}


def run(yaml_name: str, work: Path, threads: int) -> dict:
    import sqlalchemy as sa

    db = work / f"{Path(yaml_name).stem}.db"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "BAYESAL_DATA_DIR": str(work / "d")}
    bayesal = Path(sys.executable).with_name("bayesal")
    t0 = time.perf_counter()
    proc = subprocess.run([str(bayesal), "--database-url", f"sqlite:///{db}", "run",
                           str(work / yaml_name)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{yaml_name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        n, label_s = conn.execute(sa.text("SELECT COUNT(*), SUM(wall_s) FROM labels")).one()
        curve = conn.execute(sa.text(
            "SELECT round_index, metrics FROM rounds ORDER BY round_index")).all()
    engine.dispose()
    import json

    maes = [json.loads(m)["test_force_mae"] if isinstance(m, str) else m["test_force_mae"]
            for _, m in curve]
    return {"wall_s": wall, "labels": n, "label_s": label_s, "curve": maes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bayesal-bench-") as tmp:
        work = Path(tmp)
        from bayesal.datasets import write_quickstart_data

        write_quickstart_data(work / "quickstart-data")
        for name in CAMPAIGNS.values():
            (work / name).write_text((REPO / "examples" / name).read_text())
        results = {}
        for label, name in CAMPAIGNS.items():
            results[label] = r = run(name, work, args.threads)
            workers = 2  # both YAMLs label with 2 workers
            print(f"{label:16s}: {r['wall_s']:6.1f} s in all, {r['labels']} labels taking "
                  f"{r['label_s'] / workers:6.1f} s over {workers} workers "
                  f"({r['label_s'] / r['labels']:.3f} s each); test force MAE by round "
                  f"(meV/Å, each against its own level of theory): "
                  f"{' '.join(f'{1000 * m:.0f}' for m in r['curve'])}", flush=True)
        base = results["PySCF HF/STO-3G"]
        xtb = results["GFN2-xTB"]
        print(f"xTB campaign: {xtb['wall_s'] / base['wall_s']:.2f} x the PySCF campaign's wall "
              f"time; labels {base['label_s'] / xtb['label_s']:.0f} x faster")


if __name__ == "__main__":
    sys.exit(main())
