"""Replay a finished exploration campaign's training on its own labels, with variants of
the training settings: does a setting keep a few extreme labels from wrecking the model?

An exploration campaign (``benchmarks/exploration.py``) labels 8 frames a round; its
``train.xyz`` holds them in the order they were labelled (8 starting structures, then 8
per round). This script retrains rounds 0..R exactly as the campaign did, with the grid's
settings.json (150 epochs from scratch on the first 8, then 40 warm-started epochs per
round on the first 8(r+1); same seeds and validation split) and reports, after each
round, the hot-MD force and energy MAE and the median max-force-std on the hot test
frames, for each variant:

* ``as-run``: the campaign's settings (the figures should match its state.json);
* ``clip``: gradients clipped to ``--clip`` (L2 norm over all parameters; MACE clips at
  10 by default);
* ``drop-high``: the labels more than ``--drop-above`` eV above the lowest starting
  structure left out (what a filter on labels would do).

Usage: ``python benchmarks/replay_training.py results/exploration-stop-on-break/acac/
bald-ef-power-s2 --rounds 3 --variants as-run clip``. Results are appended to
``replay.json`` in the campaign folder, one record per (variant, round), and a rerun skips
what it holds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO  # noqa: F401  (puts the repository on sys.path)


def _grid_settings(folder: Path) -> dict:
    """The settings the campaign's grid ran with (exploration.py writes settings.json in
    the results folder, two levels above a campaign): epochs, members, labels per round."""
    path = folder.resolve().parents[1] / "settings.json"
    if not path.is_file():
        sys.exit(f"{path} not found: give a campaign folder of an exploration.py grid")
    return json.loads(path.read_text())


def _settings(variant: str, args, epochs: int, seed: int):
    from bayesal.bayes_model.config import TrainingFile
    from bayesal.bayes_model.train import TrainConfig

    extra = {"grad_clip": args.clip} if variant == "clip" else {}
    return TrainingFile(device="cpu", train=TrainConfig(
        max_epochs=epochs, seed=seed, patience=10**6, allow_undertrained=True,
        keep_train_state="none", **extra))


def replay(folder: Path, variant: str, args, done: set) -> list[dict]:
    import ase.io

    from bayesal.bayes_model.calibration import evaluate_prediction
    from bayesal.bayes_model.ensemble import split_validation_stable
    from bayesal.bayes_model.posterior import load_posterior, train_posterior

    seed = int(folder.name.rsplit("-s", 1)[1])
    grid = _grid_settings(folder)
    initial, per_round = grid["initial"], grid["n_select"]
    labels = ase.io.read(folder / "train.xyz", ":")
    hot = ase.io.read(folder.parent / "tests" / "hot.xyz", ":")
    e_low = min(a.get_potential_energy() for a in labels[:initial])
    out, work = [], Path(tempfile.mkdtemp(prefix="replay-"))
    try:
        previous = None
        for r in range(args.rounds):
            labelled = labels[:initial + per_round * r]
            if variant == "drop-high":
                labelled = [a for a in labelled
                            if a.get_potential_energy() - e_low <= args.drop_above]
            t0 = time.perf_counter()
            train, valid = split_validation_stable(
                labelled, [str(i) for i in range(len(labelled))], 0.1, seed=seed)
            model_dir = work / f"round-{r}"
            train_posterior("ensemble", train, valid, model_dir,
                            settings=_settings(variant, args, grid["epochs"] if r == 0
                                               else grid["finetune_epochs"], seed + 1000 * r),
                            members=grid["members"], init_from=previous)
            previous = model_dir
            if (variant, r) in done:
                continue
            posterior = load_posterior(model_dir)
            pred = posterior.predict(hot)
            metrics = evaluate_prediction(pred, hot)
            sigma = _max_force_std(pred)
            record = {"variant": variant, "round": r, "n_labels": len(labelled),
                      "hot_force_mae": metrics["force_mae"],
                      "hot_energy_mae": metrics["energy_mae"],
                      "hot_max_force_std_median": float(np.median(sigma)),
                      "train_s": time.perf_counter() - t0}
            print(json.dumps(record), flush=True)
            out.append(record)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _max_force_std(pred) -> np.ndarray:
    first = np.concatenate([[0], np.cumsum(pred.n_atoms)])
    var = np.trace(pred.forces_cov_epi, axis1=1, axis2=2)
    return np.array([np.sqrt(var[a:b]).max() for a, b in itertools.pairwise(first)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("campaign", type=Path, help="an exploration campaign's folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["as-run", "clip"],
                        choices=["as-run", "clip", "drop-high"])
    parser.add_argument("--clip", type=float, default=10.0)
    parser.add_argument("--drop-above", type=float, default=5.0, help="eV")
    args = parser.parse_args()
    path = args.campaign / "replay.json"
    records = json.loads(path.read_text()) if path.is_file() else []
    if records and records[0].get("clip", args.clip) != args.clip:
        sys.exit(f"{path} was run with --clip {records[0]['clip']}; use it or remove the file")
    for variant in args.variants:
        done = {(r["variant"], r["round"]) for r in records}
        if all((variant, r) in done for r in range(args.rounds)):
            continue
        for record in replay(args.campaign, variant, args, done):
            records.append(record | {"clip": args.clip, "drop_above": args.drop_above})
            path.write_text(json.dumps(records, indent=1))
    state = json.loads((args.campaign / "state.json").read_text())
    print("round  campaign  " + "  ".join(f"{v:>10s}" for v in args.variants)
          + "   (hot-MD force MAE meV/Å; median max-force-std eV/Å)")
    for r in range(args.rounds):
        row = [f"{1000 * state['rounds'][r]['hot_force_mae']:8.0f}"]
        for v in args.variants:
            rec = next((x for x in records if x["variant"] == v and x["round"] == r), None)
            row.append("      -   " if rec is None else f"{1000 * rec['hot_force_mae']:5.0f} "
                       f"({rec['hot_max_force_std_median']:.2f})")
        print(f"{r:5d}  " + "  ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
