"""Probe: how wide is the energy σ of the default ensemble, and does a closed-form rescale of
its aleatoric part calibrate it?

Trains the default ensemble (``--members``, ``--epochs`` from scratch) on a labelled file
(default: the training set the exploration benchmark's ethanol bald-ef seed 0 campaign
collected), then prints, on the exploration test sets (hot MD, torsion scan) and on its own
training set: the energy MAE, the medians of σ_E,ale and σ_E,epi, and the 68 % coverage of
σ_E; then the same after scaling σ²_E,ale by mean(r²/σ²_E,ale) over the training or the
validation residuals (the factor a calibration on labelled data would apply).

    python benchmarks/energy_variance.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import ase.io
import numpy as np
from exploration import RESULTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path,
                        default=RESULTS / "ethanol" / "bald-ef-s0" / "train.xyz")
    parser.add_argument("--tests", type=Path, default=RESULTS / "ethanol" / "tests")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory: trained there if missing, else reused")
    args = parser.parse_args()

    import torch

    from bayesal.bayes_model.config import TrainingFile
    from bayesal.bayes_model.ensemble import split_validation_stable
    from bayesal.bayes_model.posterior import load_posterior, train_posterior
    from bayesal.bayes_model.train import TrainConfig

    torch.set_num_threads(2)
    labelled = ase.io.read(args.train, ":")
    train, valid = split_validation_stable(labelled, [str(i) for i in range(len(labelled))],
                                           0.1, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or Path(tmp) / "m"
        if not (model_dir / "manifest.json").is_file():
            settings = TrainingFile(device="cpu", train=TrainConfig(
                max_epochs=args.epochs, seed=1, patience=10**6, allow_undertrained=True,
                keep_train_state="none"))
            train_posterior("ensemble", train, valid, model_dir, settings=settings,
                            members=args.members)
        posterior = load_posterior(model_dir)

        def residuals(images):
            """(energy: residual, σ²_ale, σ²_epi), (force components: the same)."""
            pred = posterior.predict(images)
            ref = np.array([a.get_potential_energy() for a in images])
            f_ref = np.concatenate([a.get_forces() for a in images])
            ale, epi = (np.diagonal(c, axis1=1, axis2=2).ravel()
                        for c in (pred.forces_cov_ale, pred.forces_cov_epi))
            return ((pred.energy - ref, pred.energy_var_ale, pred.energy_var_epi),
                    ((pred.forces - f_ref).ravel(), ale, epi))

        sets = {name: residuals(ase.io.read(args.tests / f"{name}.xyz", ":"))
                for name in ("hot", "torsion")}
        sets["train"] = residuals(train)
        print(f"{len(train)} training, {len(valid)} validation structures, "
              f"{args.members} members, {args.epochs} epochs")
        for kind, unit, k in (("E", "meV", 0), ("F", "meV/Å", 1)):
            fits = {"raw": 1.0, **{f"rescaled on {name} (n={len(images)})":
                                   float(np.mean(r**2 / va))
                                   for name, images in (("train", train), ("valid", valid))
                                   for r, va, _ in [residuals(images)[k]]}}
            for label, factor in fits.items():
                cells = []
                for name, parts in sets.items():
                    r, va, ve = parts[k]
                    sigma = np.sqrt(factor * va + ve)
                    cells.append(f"{name}: MAE {1000 * np.abs(r).mean():.1f}, σ_ale "
                                 f"{1000 * np.median(np.sqrt(factor * va)):.1f}, σ_epi "
                                 f"{1000 * np.median(np.sqrt(ve)):.1f}, cov68 "
                                 f"{np.mean(np.abs(r) < sigma):.2f}")
                print(f"{kind} ({unit}) {label} (σ²_ale x {factor:.4f}): " + " | ".join(cells))

if __name__ == "__main__":
    sys.exit(main())
