"""Model commands: train, predict, evaluate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flows.cli._app import app, console, err_console, user_errors


def _read_labelled(paths: list[Path]):
    from db.readers import InputError, InputIssue, iter_frames

    frames, issues = [], []
    for path in paths:
        for item in iter_frames(path, labelled=True):
            (issues if isinstance(item, InputIssue) else frames).append(item)
    if issues:
        raise InputError(issues)
    images = []
    for f in frames:  # make sure labels travel with the atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = f.atoms.copy()
        atoms.calc = SinglePointCalculator(atoms, energy=f.energy, forces=f.forces)
        images.append(atoms)
    return images


@app.command("train")
def train(
    train_files: Annotated[list[Path], typer.Option("--train", help="Labelled training data "
                                                   "(energies and forces).")],
    out: Annotated[Path, typer.Option(help="Model directory to write.")],
    valid: Annotated[list[Path] | None, typer.Option(help="Labelled validation data.")] = None,
    valid_fraction: Annotated[float, typer.Option(
        help="Share of --train held out for validation when --valid is not given.")] = 0.05,
    method: Annotated[str, typer.Option(help="Posterior method: ensemble.")] = "ensemble",
    members: Annotated[int, typer.Option(help="Ensemble members.")] = 4,
    max_minutes: Annotated[float | None, typer.Option(
        help="Wall-time budget of the whole command; members running in parallel share it.")
    ] = None,
    config: Annotated[Path | None, typer.Option(
        help="YAML with model: and train: sections (see docs/model.md).")] = None,
    isolated_atoms: Annotated[Path | None, typer.Option(
        help="Isolated-atom energies for the per-species shifts (default: least squares).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Base seed (member k uses seed + k).")
                    ] = None,
    processes: Annotated[int | None, typer.Option(
        help="Members trained at once (default: as many as cores).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue interrupted training in "
                                         "OUT/work.")] = False,
) -> None:
    """Train a Bayesian potential (deep ensemble of mean-variance e3nn models)."""
    import os

    from bayes_model.config import TrainingFile, load_training_file
    from bayes_model.ensemble import split_validation, train_ensemble

    with user_errors():
        if method != "ensemble":
            raise ValueError(f"--method {method!r}: this bayesal trains 'ensemble' (Laplace, "
                             "SWAG and IVON come with the posteriors release)")
        settings = load_training_file(config) if config else TrainingFile()
        train_cfg = settings.train
        updates = {}
        if seed is not None:
            updates["seed"] = seed
        procs = min(members, processes or os.cpu_count() or 1)
        if max_minutes is not None:
            waves = -(-members // procs)
            updates["max_minutes"] = max_minutes / waves
        train_cfg = train_cfg.model_copy(update=updates)
        images = _read_labelled(train_files)
        if valid:
            train_images, valid_images = images, _read_labelled(valid)
        else:
            train_images, valid_images = split_validation(images, valid_fraction,
                                                          seed=train_cfg.seed)
        console.print(f"training {members} members on {len(train_images)} structures "
                      f"(validation {len(valid_images)}), {procs} at a time")
        columns = [TextColumn("member {task.fields[k]}"), BarColumn(),
                   TextColumn("epoch {task.completed:.0f}"),
                   TextColumn("loss {task.fields[loss]}"),
                   TextColumn("val F MAE {task.fields[fmae]} eV/Å"), TimeElapsedColumn()]
        with Progress(*columns, console=err_console,
                      disable=not err_console.is_terminal) as progress:
            tasks = {k: progress.add_task("", total=train_cfg.max_epochs, k=k, loss="-",
                                          fmae="-") for k in range(members)}

            def on_epoch(k: int, record: dict) -> None:
                progress.update(tasks[k], completed=record["epoch"] + 1,
                                loss=f"{record['loss']:.3g}",
                                fmae=f"{record['valid_force_mae']:.4f}")

            train_ensemble(train_images, valid_images, out, members=members,
                           model_config=settings.model, train_config=train_cfg,
                           isolated_atoms=isolated_atoms, processes=procs, resume=resume,
                           on_epoch=on_epoch)
        from bayes_model.checkpoint import read_manifest

        table = Table(title=f"model {out}")
        for col in ("member", "epochs", "best epoch", "val E MAE (eV)", "val F MAE (eV/Å)",
                    "stopped by"):
            table.add_column(col)
        for k, m in enumerate(read_manifest(out).members):
            table.add_row(str(k), str(m["epochs"]), str(m["best_epoch"]),
                          f"{m['valid_energy_mae']:.4f}", f"{m['valid_force_mae']:.4f}",
                          m["stopped"])
        console.print(table)


@app.command("predict")
def predict(
    model: Annotated[Path, typer.Option(help="Model directory from `bayesal train`.")],
    input: Annotated[Path, typer.Option("--input", help="Structures (extxyz or any "
                                        "ASE-readable file).")],
    output: Annotated[Path, typer.Option(help="extxyz with predictions and uncertainties.")],
    batch_size: Annotated[int, typer.Option(help="Structures per batch.")] = 32,
) -> None:
    """Predict energies, forces and their uncertainties.

    Writes info keys pred_energy, pred_energy_std (total), pred_energy_std_epi,
    pred_energy_std_ale (eV) and arrays pred_forces, pred_forces_std, pred_forces_std_epi,
    pred_forces_std_ale (eV/Å, per component).
    """
    import ase.io
    import numpy as np

    from bayes_model.posterior import load_posterior
    from db.export import format_extxyz

    with user_errors():
        posterior = load_posterior(model)
        images = ase.io.read(input, ":")
        pred = posterior.predict(images, batch_size=batch_size)
        epi = np.sqrt(np.diagonal(pred.forces_cov_epi, axis1=1, axis2=2))
        ale = np.sqrt(np.diagonal(pred.forces_cov_ale, axis1=1, axis2=2))
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w") as fh:
            for k, (atoms, sl) in enumerate(zip(images, pred.atom_slices(), strict=True)):
                info = {key: v for key, v in atoms.info.items()
                        if isinstance(v, int | float | str)}
                info.update(pred_energy=float(pred.energy[k]),
                            pred_energy_std=float(pred.energy_std[k]),
                            pred_energy_std_epi=float(np.sqrt(pred.energy_var_epi[k])),
                            pred_energy_std_ale=float(np.sqrt(pred.energy_var_ale[k])))
                arrays = {"pred_forces": pred.forces[sl], "pred_forces_std": pred.forces_std[sl],
                          "pred_forces_std_epi": epi[sl], "pred_forces_std_ale": ale[sl]}
                pbc = "".join("T" if p else "F" for p in atoms.pbc)
                fh.write(format_extxyz(atoms.numbers, atoms.positions, atoms.cell.array, pbc,
                                       info, arrays))
        console.print(f"wrote predictions for {len(images)} structures to {output}")


@app.command("evaluate")
def evaluate(
    model: Annotated[Path, typer.Option(help="Model directory from `bayesal train`.")],
    test: Annotated[list[Path], typer.Option(help="Labelled test files (repeatable).")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write metrics as JSON.")
                        ] = None,
) -> None:
    """Accuracy (energy total/per atom, forces), NLL and Spearman ρ(|error|, σ) per test file."""
    from bayes_model.metrics import accuracy_metrics
    from bayes_model.posterior import load_posterior

    with user_errors():
        posterior = load_posterior(model)
        results = {}
        for path in test:
            images = _read_labelled([path])
            results[str(path)] = accuracy_metrics(posterior.predict(images), images)
        table = Table(title=f"evaluation of {model}")
        keys = ["energy_mae", "energy_mae_per_atom", "energy_rmse", "force_mae", "force_rmse",
                "energy_nll", "force_nll", "energy_spearman", "force_spearman"]
        table.add_column("metric")
        for path in results:
            table.add_column(Path(path).name, justify="right")
        units = {"energy_mae": "eV", "energy_mae_per_atom": "eV", "energy_rmse": "eV",
                 "force_mae": "eV/Å", "force_rmse": "eV/Å"}
        for key in keys:
            table.add_row(f"{key} {units.get(key, '')}".strip(),
                          *(f"{r.get(key, float('nan')):.4g}" for r in results.values()))
        console.print(table)
        if json_out is not None:
            json_out.write_text(json.dumps(results, indent=2))
            console.print(f"metrics written to {json_out}")
