"""Benchmark: MD stability of the exploration benchmark's final models at a harsher setting.

At the exploration benchmark's own check (1 ps at 1000 K, 6 seeds) every final model of
both molecules ran unbroken, so "stable MD >= 2x longer than random's" cannot be told
apart there. This runs the kept final models (``<molecule>/<strategy>-s<seed>/round-*``,
the newest, beside each campaign's state.json; git-ignored, so only on the machine that ran
the campaign) hotter (``--temperature``, default 1500 K) and longer (``--steps`` of 0.5 fs)
from the molecule's first start frame, ``--seeds`` Langevin seeds each, with the same break
rule (bayes_model.stability: a bond past 1.5x its covalent-radii sum, atoms too close, an
energy jump). Results go to ``<results>/stability-<T>K.json`` one model at a time, so a
rerun resumes; ``--report-only`` prints mean time to break per strategy (mean over seeds of
campaigns, each campaign the mean of its MD seeds; unbroken runs count their whole length),
how many runs broke, and the ratio to random's.

    nice python benchmarks/stability_hot.py --until 20:30
    python benchmarks/stability_hot.py --report-only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
from _common import REPO

RESULTS = REPO / "benchmarks" / "results" / "exploration"


def _models(root: Path) -> list[tuple[str, str, Path]]:
    """(molecule, campaign folder name, final round's model) of every campaign whose rounds
    all ran (its own 1000 K stability runs may be deferred)."""
    n_rounds = json.loads((root / "settings.json").read_text())["rounds"]
    out = []
    for state in sorted(root.glob("*/*/state.json")):
        final = state.parent / f"round-{n_rounds - 1}"
        if final.is_dir() and len(json.loads(state.read_text())["rounds"]) >= n_rounds:
            out.append((state.parent.parent.name, state.parent.name, final))
    return out


def _strategy(campaign: str) -> str:
    return campaign.rsplit("-s", 1)[0]


def run(args) -> None:
    import ase.io
    import torch

    from bayesal.bayes_model.posterior import load_posterior
    from bayesal.bayes_model.stability import times_to_break

    torch.set_num_threads(args.threads)
    out_file = args.out / f"stability-{args.temperature:g}K.json"
    done = json.loads(out_file.read_text()) if out_file.is_file() else {}
    deadline = None
    if args.until:
        deadline = dt.datetime.combine(dt.date.today(),
                                       dt.time.fromisoformat(args.until)).timestamp()
    for molecule, campaign, model in _models(args.out):
        key = f"{molecule}/{campaign}"
        if key in done or (args.strategies and _strategy(campaign) not in args.strategies):
            continue
        if deadline is not None and time.time() + args.model_minutes * 60 > deadline:
            print(f"{key}: not started, would not end by {args.until}", flush=True)
            continue
        t0 = time.perf_counter()
        start = ase.io.read(args.out / molecule / "tests" / "start.xyz", "0")
        breaks = times_to_break(load_posterior(model), start, seeds=range(args.seeds),
                                temperature_K=args.temperature, steps=args.steps)
        done[key] = {"model": model.name, "steps": args.steps,
                     "runs": [{"time_fs": b.time_fs, "broken": b.broken, "reason": b.reason}
                              for b in breaks],
                     "wall_s": time.perf_counter() - t0}
        tmp = out_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1))
        tmp.replace(out_file)
        times = [b.time_fs for b in breaks]
        print(f"{key}: mean {np.mean(times):.0f} fs, {sum(b.broken for b in breaks)} of "
              f"{len(breaks)} broke, {done[key]['wall_s']:.0f} s", flush=True)
    report(done, args)


def report(done: dict, args) -> None:
    print(f"\nMD stability at {args.temperature:g} K: mean time to break (fs; unbroken runs "
          f"count their whole length), over campaigns (each the mean of its MD seeds)")
    by: dict[str, dict[str, list[float]]] = {}
    broke: dict[tuple[str, str], list[int]] = {}
    for key, rec in done.items():
        molecule, campaign = key.split("/")
        strategy = _strategy(campaign)
        by.setdefault(molecule, {}).setdefault(strategy, []).append(
            float(np.mean([r["time_fs"] for r in rec["runs"]])))
        b = broke.setdefault((molecule, strategy), [0, 0])
        b[0] += sum(r["broken"] for r in rec["runs"])
        b[1] += len(rec["runs"])
    for molecule, strategies in sorted(by.items()):
        print(f"{molecule}:")
        base = np.mean(strategies["random"]) if "random" in strategies else None
        for strategy, values in sorted(strategies.items()):
            ratio = "" if base is None else f", {np.mean(values) / base:.2f}x random's"
            n_broke, n = broke[(molecule, strategy)]
            print(f"  {strategy:21s} {np.mean(values):6.0f} ± {np.std(values):4.0f} fs "
                  f"(n={len(values)} campaigns; {n_broke} of {n} runs broke{ratio})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="the exploration benchmark's results folder")
    parser.add_argument("--temperature", type=float, default=1500.0)
    parser.add_argument("--steps", type=int, default=2000, help="0.5 fs steps")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--until", default=None, help="HH:MM: start no model after it")
    parser.add_argument("--model-minutes", type=float, default=5.0,
                        help="what --until expects one model to take")
    parser.add_argument("--strategies", nargs="+", default=None,
                        help="run only these strategies' campaigns (default: all)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if args.report_only:
        out_file = args.out / f"stability-{args.temperature:g}K.json"
        report(json.loads(out_file.read_text()) if out_file.is_file() else {}, args)
    else:
        run(args)


if __name__ == "__main__":
    main()
