"""Benchmark: scoring a large candidate pool from the database as a campaign round does.

Builds a pool of ``--n`` ethanol candidates (rMD17 frames rattled by 0.05 Å, and frames of
a short Langevin MD with the model, as an explorer makes them) in a SQLite database, then
scores it with ``tasks.steps.select_batch`` (shards of ``--shard-size``, chunks, scores
stored, selection marked) in a fresh process per posterior, with ``--threads`` threads:

* ``ensemble``: the model directory given (default: a 4-member ensemble of the default
  model, trained for a few epochs here: throughput does not depend on how well);
* ``laplace-r1`` and ``laplace-r2``: last-layer Laplace fitted from its first member with
  ``force_rank`` 1 and 2 (benchmarks/laplace_cost.py compares the ranks with exact force
  covariances, which cost about 4x the ensemble).

Prints structures/s, the peak resident memory of each scoring process, and each
posterior's cost relative to the ensemble's in this run (same pool, same threads).

    python benchmarks/scoring_scale.py --n 100000          # ~1 h on 2 cores
    python benchmarks/scoring_scale.py --n 2000            # minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import shared_data

_SCORE = """
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from bayesal.bayes_model.acquisition import AcquisitionConfig
from bayesal.db import make_engine
from bayesal.db.rounds import open_round
from bayesal.tasks.steps import select_batch
engine = make_engine(sys.argv[1])
campaign = sys.argv[3]
rid = open_round(engine, campaign).id
t0 = time.perf_counter()
ids, stats = select_batch(engine, campaign, rid, "none", sys.argv[2],
                          AcquisitionConfig(n_select=10, shard_size=int(sys.argv[5])),
                          seed=0, device="cpu")
print(json.dumps({"seconds": time.perf_counter() - t0, "n_scored": stats["n_scored"],
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build_pool(n: int, posterior) -> list:
    import ase.io

    from bayesal.bayes_model.explore import explore

    frames = ase.io.read(shared_data() / "ethanol" / "train.xyz", ":")
    rng = np.random.default_rng(0)
    md = [f for t in explore(posterior, frames[:8], temperatures_K=[300.0, 600.0], steps=200,
                             record_every=2, max_force_std_threshold=1e9)
          for f in t.frames]
    pool = []
    for k in range(n):
        if k % 4 == 3:  # a quarter MD frames, re-rattled so that none repeats
            a = md[k % len(md)].copy()
            a.positions += rng.normal(scale=0.01, size=a.positions.shape)
        else:
            a = frames[k % len(frames)].copy()
            a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        a.calc = None
        a.info = {}
        pool.append(a)
    return pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--model", type=Path, default=None, help="ensemble model directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=20_000)
    args = ap.parse_args()

    import ase.io
    import torch

    from bayesal.bayes_model.checkpoint import load_members, save_members
    from bayesal.bayes_model.config import TrainingFile
    from bayesal.bayes_model.posterior import fit_posterior, load_posterior, train_posterior
    from bayesal.bayes_model.train import TrainConfig
    from bayesal.db import make_engine
    from bayesal.db.importer import import_atoms

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = ase.io.read(shared_data() / "ethanol" / "train.xyz", ":40")
        model = args.model
        if model is None:
            model = root / "ensemble"
            train_posterior("ensemble", train[:32], train[32:], model, members=4,
                            settings=TrainingFile(device="cpu", train=TrainConfig(
                                max_epochs=3, allow_undertrained=True,
                                keep_train_state="none")))
        (first, *_), _ = load_members(model)
        save_members(root / "plain", [first])
        dirs = {"ensemble": model}
        for rank in (1, 2):
            dirs[f"laplace-r{rank}"] = fit_posterior(
                "laplace", root / "plain", train[:32], train[32:], root / f"laplace-r{rank}",
                settings=TrainingFile.model_validate(
                    {"device": "cpu", "posterior": {"laplace": {"force_rank": rank}}}),
                recalibrate=False)
        t0 = time.perf_counter()
        pool = build_pool(args.n, load_posterior(model))
        url = f"sqlite:///{root / 'pool.db'}"
        engine = make_engine(url)
        results = {}
        for name in dirs:
            import_atoms(engine, pool, name)
        engine.dispose()
        del pool
        print(f"pool of {args.n} built and imported (x{len(dirs)}) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        script = root / "score.py"
        script.write_text(_SCORE)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for name, path in dirs.items():
            proc = subprocess.run([sys.executable, str(script), url, str(path), name,
                                   str(args.threads), str(args.shard_size)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{name}: {proc.stderr[-3000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[name]
            print(f"{name:14s} {r['n_scored']} scored in {r['seconds']:.0f} s: "
                  f"{r['n_scored'] / r['seconds']:.0f} structures/s, peak "
                  f"{r['peak_mb']:.0f} MB", flush=True)
    base = results["ensemble"]["seconds"]
    for name, r in results.items():
        print(f"{name:14s} cost / ensemble = {r['seconds'] / base:.2f} "
              f"({base / r['seconds']:.1f}x cheaper)")
    print(json.dumps({"n": args.n, "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
