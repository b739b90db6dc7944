"""Benchmark: accuracy of our models vs NequIP at equal wall budget and equal threads.

For each molecule (shared data: ethanol rMD17 PBE/def2-SVP; acetylacetone PBE-D3(BJ)/
def2-SVP): 450 training / 50 validation frames (fixed random split of the training file),
isolated-atom energies given, tested on frames of the shared test files (acac: 300 K test
MD and 600 K frames). Contenders, each a whole command with ``--threads`` threads and
``--minutes`` of wall time, run ``--jobs`` at a time:

* ``single``: ``bayesal train --members 1`` (our defaults);
* ``ensemble``: ``bayesal train`` (the default ensemble: 4 members continuing from a shared
  start model, sharing the budget);
* ``nequip``: one NequIP 0.19 model, tutorial settings (benchmarks/_nequip_driver.py).

Prints energy and force MAE, their ratios against NequIP, epochs done, the command's wall
time against its budget, and plots validation force MAE vs seconds for all
(``<out>/accuracy_curves.png``). Every contender writes ``<out>/<molecule>/<name>.json`` and
is skipped when it exists (resumable; ``--report-only`` prints the report).

    python benchmarks/model_accuracy.py --out /work/bench-accuracy            # 2 x 3 x 10 min
    python benchmarks/model_accuracy.py --out /tmp/acc --minutes 1 --molecule ethanol
NequIP's python: --nequip-python or $BAYESAL_NEQUIP_PYTHON (default: this python; install
with `pip install nequip==0.19.1` beside torch 2.13.0).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ase.io
import numpy as np
from _common import (
    add_command_options,
    add_nequip_option,
    bayesal_train,
    run_commands,
    run_nequip,
    shared_data,
)
from training_curves import MOLECULES, split

CONTENDERS = ("single", "ensemble", "nequip")


def run_ours(molecule: str, name: str, args, work: Path) -> dict:
    from bayesal.bayes_model.metrics import accuracy_metrics
    from bayesal.bayes_model.posterior import load_posterior

    test = ase.io.read(work / "test.xyz", ":")
    wall, members = bayesal_train(work, work / name, args.minutes, args.threads,
                                  *(["--members", "1"] if name == "single" else []))
    pred = load_posterior(work / name).predict(test)
    return {"wall_s": wall,  # epochs of each member, its shared start's included
            "epochs": [m["epochs"] + m.get("shared_epochs", 0) for m in members],
            "curves": [m.get("curve", []) for m in members],
            "test": accuracy_metrics(pred, test)}


def nequip(args, work: Path) -> dict:
    res = run_nequip(args.nequip_python, work, args.minutes, args.threads)
    curve = res.pop("curve")
    return {"wall_s": res.pop("wall_s"), "epochs": [len(curve)], "curves": [curve],
            "test": res}


def run(molecule: str, name: str, args) -> str:
    path = Path(args.out) / molecule / f"{name}.json"
    train, valid, test, isolated = split(shared_data(), molecule, 450, 50, args.n_test)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for fname, images in (("train", train), ("val", valid), ("test", test)):
            ase.io.write(work / f"{fname}.xyz", images, format="extxyz")
        (work / "isolated.xyz").write_bytes(isolated.read_bytes())
        result = (nequip(args, work) if name == "nequip"
                  else run_ours(molecule, name, args, work))
    result.update(molecule=molecule, contender=name, minutes=args.minutes,
                  threads=args.threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return str(path)


def report(out: Path) -> None:
    results = {}
    for path in sorted(out.glob("*/*.json")):
        r = json.loads(path.read_text())
        results[(r["molecule"], r["contender"])] = r
    if not results:
        print("no results yet")
        return
    for molecule in sorted({m for m, _ in results}):
        rows = {c: results[(molecule, c)] for c in CONTENDERS if (molecule, c) in results}
        ref = rows.get("nequip")
        any_row = next(iter(rows.values()))
        print(f"\n{molecule}: 450 train / 50 validation, test {any_row['test']['n_structures']}"
              f" frames; {any_row['minutes']:g} min and {any_row['threads']} thread(s) each")
        print(f"{'contender':<12}{'E MAE meV':>10}{'F MAE meV/Å':>13}{'E ratio':>9}"
              f"{'F ratio':>9}{'epochs':>14}{'wall s':>8}{'/budget':>9}")
        for name, r in rows.items():
            t = r["test"]
            ratios = (f"{t['energy_mae'] / ref['test']['energy_mae']:>9.2f}"
                      f"{t['force_mae'] / ref['test']['force_mae']:>9.2f}") if ref else ""
            print(f"{name:<12}{t['energy_mae'] * 1e3:>10.1f}{t['force_mae'] * 1e3:>13.1f}"
                  f"{ratios:<18}{','.join(map(str, r['epochs'])):>14}{r['wall_s']:>8.0f}"
                  f"{r['wall_s'] / (60 * r['minutes']):>9.3f}")
    plot(results, out / "accuracy_curves.png")
    print(f"\nplot: {out / 'accuracy_curves.png'}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    molecules = sorted({m for m, _ in results})
    fig, axes = plt.subplots(1, len(molecules), figsize=(5.5 * len(molecules), 4), squeeze=False)
    for ax, molecule in zip(axes[0], molecules, strict=True):
        for name, color in zip(CONTENDERS, ("C0", "C1", "C3"), strict=True):
            r = results.get((molecule, name))
            if not r:
                continue
            for k, curve in enumerate(r["curves"]):
                if curve:
                    c = np.array(curve, dtype=float)
                    ax.plot(c[:, 0], c[:, 1] * 1e3, color=color, alpha=1 if k == 0 else 0.4,
                            label=name if k == 0 else None)
        ax.set(yscale="log", xlabel="training seconds (per member)",
               ylabel="validation force MAE (meV/Å)", title=molecule)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_command_options(ap, minutes=10.0)
    ap.add_argument("--molecule", action="append", choices=sorted(MOLECULES))
    ap.add_argument("--contender", action="append", choices=CONTENDERS)
    ap.add_argument("--n-test", type=int, default=400)
    add_nequip_option(ap)
    args = ap.parse_args()
    out = Path(args.out)
    if not args.report_only:
        todo = [(m, c) for m in (args.molecule or sorted(MOLECULES))
                for c in (args.contender or CONTENDERS)
                if not (out / m / f"{c}.json").exists()]
        run_commands(run, todo, args)
    report(out)


if __name__ == "__main__":
    main()
