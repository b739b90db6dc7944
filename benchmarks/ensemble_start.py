"""Benchmark: ensembles whose members start from one shared model (``train.shared_start``)
vs independent members, at equal wall budget and equal threads.

For each molecule (shared data, 450 training / 50 validation frames, isolated-atom energies)
and each variant, one ``bayesal train`` command (``--members``, ``--max-minutes``,
``OMP_NUM_THREADS=--threads``) run ``--jobs`` at a time:

* ``single``: one model (``--members 1``), the accuracy reference;
* ``shared=F``: the ensemble with ``train.shared_start: F`` (``shared=0``: independent
  members, each from its own random weights).

Reports on held-out frames: force and energy MAE (and the ratio to ``single``), force NLL and
miscalibration area after the validation variance scale, Spearman ρ between the force error
and the predicted force std (raw), the mean epistemic force std, and (acac) the AUROC of telling
600 K frames from 300 K test frames by epistemic energy/force uncertainty. Resumable: every
command writes ``<out>/<molecule>/<variant>-s<seed>.json`` and is skipped when it exists.

    python benchmarks/ensemble_start.py --out /work/bench-start --minutes 6   # ~40 min
    python benchmarks/ensemble_start.py --out /tmp/s --minutes 1 --molecule acac --n-test 60
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ase.io
import numpy as np
from _common import add_command_options, bayesal_train, run_commands, shared_data
from training_curves import MOLECULES, split


def variant_names(shares: list[float]) -> list[str]:
    return ["single", *(f"shared={s:g}" for s in shares)]


def evaluate(model_dir: Path, test, ood) -> dict:
    from bayesal.bayes_model.calibration import Recalibration, calibration_metrics, ood_auroc
    from bayesal.bayes_model.metrics import accuracy_metrics
    from bayesal.bayes_model.posterior import load_posterior

    post = load_posterior(model_dir)
    recal = Recalibration.load(model_dir)
    pred = post.predict(test)
    out = accuracy_metrics(pred, test)
    out["force_nll_recal"] = accuracy_metrics(recal.apply(pred), test)["force_nll"]
    out.update(calibration_metrics(pred, test, recalibration=recal))
    epi = np.sqrt(np.clip(np.trace(pred.forces_cov_epi, axis1=1, axis2=2), 0, None))
    out["force_epi_std"] = float(epi.mean())
    if ood:
        out.update(ood_auroc(pred, post.predict(ood)))
    return out


def run(molecule: str, variant: str, seed: int, args) -> str:
    path = Path(args.out) / molecule / f"{variant}-s{seed}.json"
    train, valid, test, isolated = split(shared_data(), molecule, 450, 50, args.n_test)
    # acac's held-out set is half 300 K test MD, half 600 K frames (the OOD ones)
    ood = test[len(test) // 2:] if molecule == "acac" else []
    test = test[: len(test) // 2] if molecule == "acac" else test
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, images in (("train", train), ("val", valid)):
            ase.io.write(work / f"{name}.xyz", images, format="extxyz")
        shared = 0.0 if variant == "single" else float(variant.split("=")[1])
        (work / "cfg.yaml").write_text(f"train:\n  shared_start: {shared}\n  seed: {seed}\n")
        wall, members = bayesal_train(
            work, work / "model", args.minutes, args.threads, "--config", str(work / "cfg.yaml"),
            "--members", "1" if variant == "single" else str(args.members), isolated=isolated)
        result = {"molecule": molecule, "variant": variant, "seed": seed,
                  "minutes": args.minutes, "threads": args.threads, "wall_s": wall,
                  "epochs": [m["epochs"] + m.get("shared_epochs", 0) for m in members],
                  "n_test": len(test), "n_ood": len(ood),
                  **evaluate(work / "model", test, ood)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return str(path)


def report(out: Path, variants: list[str]) -> None:
    rows: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(out.glob("*/*.json")):
        r = json.loads(path.read_text())
        rows.setdefault((r["molecule"], r["variant"]), []).append(r)
    if not rows:
        print("no results yet")
        return
    cols = [("F MAE", "force_mae", 1e3, ".1f"), ("E MAE", "energy_mae", 1e3, ".1f"),
            ("F NLL", "force_nll_recal", 1, ".2f"),
            ("miscal F", "force_miscal_area_recal", 1, ".3f"), ("ρ F", "force_spearman", 1, ".2f"),
            ("σ_epi F", "force_epi_std", 1e3, ".1f"), ("AUROC E", "ood_auroc_energy", 1, ".3f"),
            ("AUROC F", "ood_auroc_force", 1, ".3f")]
    for molecule in sorted({m for m, _ in rows}):
        ref = rows.get((molecule, "single"))
        any_r = next(v for (m, _), v in rows.items() if m == molecule)[0]
        print(f"\n{molecule}: 450 train / 50 validation, {any_r['n_test']} test"
              + (f" + {any_r['n_ood']} OOD (600 K)" if any_r["n_ood"] else "")
              + f" frames; {any_r['minutes']:g} min, {any_r['threads']} thread(s) each; "
              "mean over seeds (n)")
        print(f"{'variant':<12}{'n':>3}" + "".join(f"{c[0]:>10}" for c in cols)
              + f"{'F/single':>10}{'epochs':>14}{'/budget':>9}")
        for v in variants:
            rs = rows.get((molecule, v))
            if not rs:
                continue

            def mean(key: str, rs=rs) -> float:
                return float(np.mean([r.get(key, np.nan) for r in rs]))

            line = f"{v:<12}{len(rs):>3}" + "".join(
                f"{mean(key) * f:>10{fmt}}" for _, key, f, fmt in cols)
            ratio = mean("force_mae") / np.mean([r["force_mae"] for r in ref]) if ref else np.nan
            epochs = ",".join(map(str, rs[0]["epochs"]))
            line += (f"{ratio:>10.2f}{epochs:>14}"
                     f"{mean('wall_s') / (60 * rs[0]['minutes']):>9.3f}")
            print(line)
    print("(MAE in meV, meV/Å; NLL and miscalibration area after the validation variance "
          "scale; σ_epi F: mean epistemic force std, meV/Å; epochs: first seed, start + own)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_command_options(ap, minutes=6.0)
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--shared", type=float, action="append",
                    help="shared_start values (repeatable; default 0, 0.5, 0.75)")
    ap.add_argument("--molecule", action="append", choices=sorted(MOLECULES))
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--n-test", type=int, default=400)
    args = ap.parse_args()
    out = Path(args.out)
    variants = variant_names(args.shared or [0.0, 0.5, 0.75])
    if not args.report_only:
        todo = [(m, v, s) for s in range(args.seeds)
                for m in (args.molecule or sorted(MOLECULES)) for v in variants
                if not (out / m / f"{v}-s{s}.json").exists()]
        run_commands(run, todo, args)
    report(out, variants)


if __name__ == "__main__":
    main()
