"""Model commands: train, predict, evaluate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bayesal.cli._app import (
    DEVICE_OPTION_HELP,
    KERNELS_OPTION_HELP,
    DeviceOption,
    KernelsOption,
    Reporter,
    SeveralAfterOneFlag,
    app,
    atomic_output,
    check_method,
    console,
    err_console,
    load_model_on,
    read_frames,
    user_errors,
)


def _read_labelled(paths: list[Path]):
    return read_frames(paths, labelled=True)


class _TrainingReport:
    """Training progress: on a terminal one bar per model (epoch, loss, running training
    and validation force MAE, time left of the budget); otherwise (a log file, a batch
    job) a line per model at most every ``every_s`` seconds (``$BAYESAL_PROGRESS_SECONDS``,
    default 10), from its first epoch on."""

    def __init__(self, members: int, max_epochs: int, deadline, method: str,
                 every_s: float | None = None) -> None:
        import os

        if every_s is None:  # the interval of every command's progress lines
            every_s = float(os.environ.get("BAYESAL_PROGRESS_SECONDS", "10"))
        self.members, self.max_epochs, self.deadline = members, max_epochs, deadline
        self.method, self.every_s = method, every_s
        self.live = err_console.is_terminal
        columns = [TextColumn("{task.fields[k]}"), BarColumn(),
                   TextColumn("epoch {task.completed:.0f}"),
                   TextColumn("loss {task.fields[loss]}"),
                   TextColumn("F MAE train {task.fields[train]} val {task.fields[fmae]} eV/Å"),
                   TimeElapsedColumn(), TextColumn("{task.fields[left]}")]
        self.progress = Progress(*columns, console=err_console, disable=not self.live)
        self.tasks: dict = {}
        self.last: dict = {}

    def __enter__(self):
        self.progress.__enter__()
        for k in range(self.members):
            self._task(k, self.max_epochs)
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def _task(self, k, total):
        if k not in self.tasks:
            self.tasks[k] = self.progress.add_task("", total=total, k=self._name(k), loss="-",
                                                   train="-", fmae="-", left="")
        return self.tasks[k]

    @staticmethod
    def _name(k) -> str:
        from bayesal.bayes_model.ensemble import SHARED_KEY

        return f"member {k}" if isinstance(k, int) else (
            "shared start" if k == SHARED_KEY else str(k))

    def _left(self) -> str:
        if self.deadline is None:
            return ""
        return f"{max(self.deadline.remaining(), 0.0) / 60:.1f} min of budget left"

    def _show(self, k, record: dict) -> None:
        import math
        import time

        fields = {"loss": f"{record.get('loss', math.nan):.3g}",
                  "train": f"{record.get('train_force_mae', math.nan):.4f}",
                  "fmae": f"{record.get('valid_force_mae', math.nan):.4f}",
                  "left": self._left()}
        self.progress.update(self._task(k, None), completed=record["epoch"] + 1, **fields)
        if self.live:
            return
        now = time.monotonic()
        if now - self.last.get(k, -math.inf) >= self.every_s:
            self.last[k] = now
            console.print(f"{self._name(k)} epoch {record['epoch'] + 1}: loss "
                          f"{fields['loss']}, force MAE train {fields['train']} "
                          f"validation {fields['fmae']} eV/Å"
                          + (f", {fields['left']}" if fields["left"] else ""))

    def epoch(self, k, record: dict) -> None:
        self._show(k, record)

    def posterior(self, record: dict) -> None:
        self._show(self.method, record)


def _print_default_config(value: bool) -> None:
    if value:
        from bayesal.bayes_model.config import default_yaml

        typer.echo("# bayesal train --config FILE: every setting with its default; keep the "
                   "ones you change\n" + default_yaml(), nl=False)
        raise typer.Exit()


@app.command("train", cls=SeveralAfterOneFlag)
def train(
    train_files: Annotated[list[Path], typer.Option("--train", help="Labelled training data "
                                                   "(energies and forces).")],
    out: Annotated[Path, typer.Option(help="Model directory to write.")],
    valid: Annotated[list[Path] | None, typer.Option(help="Labelled validation data.")] = None,
    valid_fraction: Annotated[float, typer.Option(
        help="Share of --train held out for validation when --valid is not given.")] = 0.05,
    method: Annotated[str, typer.Option(
        help="Posterior: ensemble, laplace (last layer), swag or ivon (one model + posterior)."
    )] = "ensemble",
    members: Annotated[int, typer.Option(help="Ensemble members (method ensemble).")] = 4,
    max_minutes: Annotated[float | None, typer.Option(
        help="Wall-time budget of the whole command: reading data, all members, the "
             "posterior fit and calibration (members in waves get equal slots).")
    ] = None,
    config: Annotated[Path | None, typer.Option(
        help="YAML with model: and train: sections (see docs/model.md).")] = None,
    isolated_atoms: Annotated[Path | None, typer.Option(
        help="Isolated-atom energies for the per-species shifts (default: least squares).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Base seed (member k uses seed + k).")
                    ] = None,
    processes: Annotated[int | None, typer.Option(
        help="Members trained at once (default: as many as the CPU share allows: affinity, "
             "SLURM_CPUS_PER_TASK, OMP_NUM_THREADS).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue interrupted training in "
                                         "OUT/work.")] = False,
    device: Annotated[str | None, typer.Option(
        help=DEVICE_OPTION_HELP + " Ensemble members spread over the visible GPUs (member "
        "k on GPU k mod n). Default: the --config file's device, else auto.",
        show_default=False)] = None,
    kernels: Annotated[str | None, typer.Option(
        help=KERNELS_OPTION_HELP + " Default: the --config file's kernels, else e3nn.",
        show_default=False)] = None,
    allow_undertrained: Annotated[bool, typer.Option(
        "--allow-undertrained", help="Keep a model no better than the trivial predictor, or "
        "stopped by --max-minutes before train.min_epochs, with a warning instead of an "
        "error.")] = False,
    print_config: Annotated[bool, typer.Option(
        "--print-config", is_eager=True, callback=_print_default_config,
        help="Print every --config setting with its default and meaning (YAML) and exit.")
    ] = False,
) -> None:
    """Train a Bayesian potential (ensemble, Laplace, SWAG or IVON).

    A deep ensemble of mean-variance e3nn models, or one model with a last-layer Laplace,
    SWAG or IVON posterior. Variance scales are fitted on the validation data
    (OUT/calibration.json)."""
    from bayesal.bayes_model.config import load_training_file
    from bayesal.bayes_model.device import describe_devices, member_devices
    from bayesal.bayes_model.ensemble import split_validation
    from bayesal.bayes_model.posterior import describe_budget, plan_training
    from bayesal.bayes_model.resources import Deadline, cpu_share

    deadline = Deadline.after(max_minutes)  # the budget covers everything from here
    with user_errors():
        plan = plan_training(check_method(method), members,
                             load_training_file(config) if config else None,
                             processes=processes, seed=seed, device=device, kernels=kernels)
        method, members, train_cfg = plan.method, plan.members, plan.settings.train
        devices = member_devices(plan.settings.device, members,
                                 what="--device" if device else f"{config}: device")
        images = _read_labelled(train_files)
        if valid:
            train_images, valid_images = images, _read_labelled(valid)
        else:
            train_images, valid_images = split_validation(images, valid_fraction,
                                                          seed=train_cfg.seed)
        share, limit = cpu_share()
        console.print(f"training {method} ({members} model{'s' * (members > 1)}) on "
                      f"{len(train_images)} structures (validation {len(valid_images)}), "
                      f"{plan.processes} at a time x {plan.threads} thread(s) (CPU share {share}, "
                      f"set by {limit}), {describe_devices(devices)}")
        if deadline is not None:
            console.print(describe_budget(method, max_minutes, members, plan.processes,
                                          train_cfg.shared_start))
        reporter = _TrainingReport(members, train_cfg.max_epochs, deadline, method)
        with reporter:
            plan.run(train_images, valid_images, out, isolated_atoms=isolated_atoms,
                     resume=resume, on_epoch=reporter.epoch, on_posterior=reporter.posterior,
                     deadline=deadline)
        from bayesal.bayes_model.checkpoint import read_manifest

        table = Table(title=f"model {out}")
        for col in ("member", "epochs", "best epoch", "val E MAE (eV)", "val F MAE (eV/Å)",
                    "stopped by"):
            table.add_column(col)
        for k, m in enumerate(read_manifest(out).members):
            table.add_row(str(k), str(m["epochs"]), str(m["best_epoch"]),
                          f"{m['valid_energy_mae']:.4f}", f"{m['valid_force_mae']:.4f}",
                          m["stopped"])
        console.print(table)
        _print_calibration(out)
        _verdict(out, allow_undertrained or train_cfg.allow_undertrained)


def _verdict(model_dir: Path, allow: bool) -> None:
    """The model's quality line; an error for an under-trained one unless ``allow``."""
    from bayesal.bayes_model.quality import UndertrainedError, check_trained

    try:
        q = check_trained(model_dir)
    except UndertrainedError as exc:
        if not allow:
            raise
        err_console.print(f"warning: {exc}")
        return
    if q is not None:
        console.print(f"checked: {q.summary()}: better than the trivial predictor")


def _print_calibration(model_dir: Path) -> None:
    from bayesal.bayes_model.calibration import Recalibration

    recal = Recalibration.load(model_dir)
    if recal is not None:
        if (recal.energy_aleatoric_scale, recal.force_aleatoric_scale) != (1.0, 1.0):
            console.print("aleatoric variance scales from the training residuals: energy "
                          f"x{recal.energy_aleatoric_scale:.3g}, forces "
                          f"x{recal.force_aleatoric_scale:.3g}")
        console.print(f"variance scales from validation: energy x{recal.energy_scale:.3g}, "
                      f"forces x{recal.force_scale:.3g} (stored in {model_dir}/calibration.json)")


@app.command("predict")
def predict(
    model: Annotated[Path, typer.Option(help="Model directory from `bayesal train`.")],
    input: Annotated[Path, typer.Option("--input", help="Structures (extxyz or any "
                                        "ASE-readable file).")],
    output: Annotated[Path, typer.Option(help="extxyz with predictions and uncertainties.")],
    predict_batch: Annotated[int, typer.Option(
        "--predict-batch", "--batch-size", help="Structures per forward pass "
        "(--batch-size: the old name).")] = 32,
    method: Annotated[str | None, typer.Option(
        help="Expected posterior method (checked against the model).")] = None,
    recalibrated: Annotated[bool, typer.Option(
        help="Apply the model's validation variance scales.")] = True,
    device: DeviceOption = "auto",
    kernels: KernelsOption = "e3nn",
) -> None:
    """Predict energies, forces and their uncertainties.

    Writes info keys pred_energy, pred_energy_std (total), pred_energy_std_epistemic,
    pred_energy_std_aleatoric, pred_max_force_std_epistemic (eV, eV/Å) and arrays
    pred_forces, pred_forces_std, pred_forces_std_epistemic, pred_forces_std_aleatoric
    (eV/Å, per component): the numbers the ASE calculator returns and scoring uses.
    Cells periodic in all three directions also get pred_stress and
    pred_stress_std_epistemic (eV/Å³, Voigt order xx yy zz yz xz xy). Standard deviations
    are recalibrated with the model's calibration.json unless --no-recalibrated.
    """
    from bayesal.bayes_model.predict import file_fields, predict_calibrated, structure_results
    from bayesal.db.export import atoms_extxyz

    with user_errors():
        posterior = load_model_on(model, device, method, kernels)
        images = read_frames([input])
        with Reporter("predicting", "structures", total=len(images)) as progress:
            pred = predict_calibrated(posterior, images, batch_size=predict_batch,
                                      recalibrated=recalibrated, on_progress=progress.update)
        with atomic_output(output) as part, open(part, "w") as fh:
            for k, (atoms, sl) in enumerate(zip(images, pred.atom_slices(), strict=True)):
                info = {key: v for key, v in atoms.info.items()
                        if isinstance(v, int | float | str)}
                extra, arrays = file_fields(structure_results(pred, k, sl))
                fh.write(atoms_extxyz(atoms, {**info, **extra}, arrays))
        console.print(f"wrote predictions for {len(images)} structures to {output}")


@app.command("md")
def md(
    model: Annotated[Path, typer.Option(help="Model directory from `bayesal train`.")],
    input: Annotated[Path, typer.Option("--input", help="Starting structure (extxyz or any "
                                        "ASE-readable file).")],
    output: Annotated[Path, typer.Option(help="extxyz trajectory with energies, forces and "
                                         "uncertainties per frame.")],
    frame: Annotated[int, typer.Option(help="Which frame of --input to start from.")] = 0,
    temperature: Annotated[float, typer.Option(help="Langevin temperature, K.")] = 300.0,
    steps: Annotated[int, typer.Option(min=1, help="MD steps.")] = 1000,
    timestep: Annotated[float, typer.Option(help="Time step, fs.")] = 0.5,
    friction: Annotated[float, typer.Option(help="Langevin friction, 1/fs.")] = 0.01,
    interval: Annotated[int, typer.Option(min=1, help="Write every n-th step.")] = 10,
    stop_above: Annotated[float | None, typer.Option(
        help="Stop when max_force_std_epistemic (eV/Å) exceeds this: the model "
             "extrapolates (that frame is written too).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the velocities and Langevin noise.")
                    ] = 0,
    device: DeviceOption = "auto",
    kernels: KernelsOption = "e3nn",
) -> None:
    """Run Langevin MD with the model and write a trajectory with its uncertainties.

    Each written frame carries what `bayesal predict` writes (recalibrated): info
    pred_energy, pred_energy_std, pred_energy_std_epistemic, pred_max_force_std_epistemic,
    ..., arrays pred_forces, pred_forces_std_epistemic, ...; plus step, time_fs and the
    instantaneous temperature_K. Frames are appended as the run goes (an interrupted run
    keeps the frames written so far).
    """
    import numpy as np
    import torch

    from bayesal.bayes_model.calculator import attach_uncertainty_log
    from bayesal.bayes_model.explore import langevin
    from bayesal.bayes_model.resources import cpu_share

    with user_errors():
        posterior = load_model_on(model, device, kernels=kernels)
        images = read_frames([input])
        if not -len(images) <= frame < len(images):
            raise ValueError(f"--frame {frame}: {input} has {len(images)} frame(s)")
        torch.set_num_threads(cpu_share()[0])
        atoms = images[frame].copy()
        dyn = langevin(atoms, posterior, temperature_K=temperature, timestep_fs=timestep,
                       friction_per_fs=friction, rng=np.random.default_rng(seed))
        output.parent.mkdir(parents=True, exist_ok=True)
        stopped = None
        with open(output, "w") as fh, Reporter(f"MD {temperature:g} K", "steps",
                                               total=steps) as progress:
            write_frame = attach_uncertainty_log(dyn, fh, interval=interval)
            for step in range(1, steps + 1):
                dyn.run(1)
                sigma = atoms.calc.results["max_force_std_epistemic"]
                progress.describe(f"MD {temperature:g} K, max σ_F,epi {sigma:.3f} eV/Å")
                progress.update(step)
                if stop_above is not None and not sigma <= stop_above:
                    if step % interval:  # the frame that crossed is written too
                        write_frame()
                    stopped = step
                    break
        if stopped is not None:
            console.print(f"stopped at step {stopped}: max_force_std_epistemic {sigma:.3f} "
                          f"eV/Å > {stop_above:g} (the model extrapolates)")
        console.print(f"wrote {output} ({stopped or steps} steps of {timestep:g} fs, every "
                      f"{interval}th)")


@app.command("evaluate", cls=SeveralAfterOneFlag)
def evaluate(
    model: Annotated[Path, typer.Option(help="Model directory from `bayesal train`.")],
    test: Annotated[list[Path], typer.Option(
        help="Labelled test files (several after one flag, or the flag repeated). Files "
             "with energies alone (reaction paths, scans) get energy and profile metrics.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write metrics as JSON.")
                        ] = None,
    ood: Annotated[list[Path] | None, typer.Option(
        help="Out-of-distribution structures: AUROC of telling them from each test file by "
             "epistemic uncertainty.")] = None,
    plots: Annotated[Path | None, typer.Option(
        help="Write reliability diagrams and error-vs-σ plots (PNG) here.")] = None,
    recalibrate_on: Annotated[Path | None, typer.Option(
        help="Refit the variance scales on these labelled structures and store them with "
             "the model.")] = None,
    isotonic: Annotated[bool, typer.Option(
        help="With --recalibrate-on: also fit isotonic recalibration.")] = False,
    prior_weight: Annotated[float | None, typer.Option(
        min=0, show_default=False,
        help="With --recalibrate-on: pseudo-structures at the uncorrected scale "
             "(default 0.25 as in training; 0 = maximum likelihood s² = mean(z²)).")] = None,
    method: Annotated[str | None, typer.Option(
        help="Expected posterior method (checked against the model).")] = None,
    device: DeviceOption = "auto",
    kernels: KernelsOption = "e3nn",
) -> None:
    """Accuracy, NLL, calibration and OOD detection per test file.

    Energy (total/per atom) and force MAE/RMSE, NLL, Spearman ρ(|error|, σ), miscalibration
    area, ENCE and 68/95 % coverage (before and after recalibration), and with --ood the
    AUROC of separating OOD structures by epistemic uncertainty."""

    from bayesal.bayes_model.calibration import (
        Recalibration,
        evaluate_prediction,
        fit_recalibration,
        ood_auroc,
        plot_calibration,
    )
    from bayesal.bayes_model.predict import predict_in_chunks

    with user_errors():
        posterior = load_model_on(model, device, method, kernels)

        def predict(images, what: str):
            with Reporter(f"predicting {what}", "structures", total=len(images)) as progress:
                return predict_in_chunks(posterior, images, on_progress=progress.update)

        if recalibrate_on is not None:
            images = read_frames([recalibrate_on], labelled=True, forces_optional=True)
            prior = {} if prior_weight is None else {"prior_weight": prior_weight}
            kept = posterior.recalibration or Recalibration()  # its aleatoric scales stay
            recal = fit_recalibration(predict(images, recalibrate_on.name), images,
                                      isotonic=isotonic, aleatoric=(
                                          kept.energy_aleatoric_scale,
                                          kept.force_aleatoric_scale), **prior)
            recal.save(model)
            posterior.recalibration = recal
            console.print(f"recalibrated on {recalibrate_on}: energy variance x"
                          f"{recal.energy_scale:.3g}, force variance x{recal.force_scale:.3g}")
        recal = posterior.recalibration
        ood_preds = {}
        for path in ood or []:
            ood_preds[str(path)] = predict(read_frames([path]), path.name)
        results = {}
        for path in test:
            images = read_frames([path], labelled=True, forces_optional=True)
            pred = predict(images, path.name)
            metrics = evaluate_prediction(pred, images, recalibration=recal, profile=True)
            for name, ood_pred in ood_preds.items():
                for k, v in ood_auroc(pred, ood_pred).items():
                    metrics[k if len(ood_preds) == 1 else f"{k}:{Path(name).name}"] = v
            if plots is not None:
                for png in plot_calibration(pred, images, plots, Path(path).stem,
                                            recalibration=recal):
                    console.print(f"plot: {png}")
            results[str(path)] = metrics
        units = {"energy_mae": "eV", "energy_mae_per_atom": "eV", "energy_rmse": "eV",
                 "force_mae": "eV/Å", "force_rmse": "eV/Å", "energy_profile_mae": "eV",
                 "energy_profile_rmse": "eV", "energy_range_error": "eV",
                 "energy_barrier_error": "eV"}
        keys = list(dict.fromkeys(k for r in results.values() for k in r
                                  if k not in ("n_structures", "n_atoms")))
        table = Table(title=f"evaluation of {model} ({posterior.manifest.method})")
        table.add_column("metric")
        for path in results:
            table.add_column(Path(path).name, justify="right")
        for key in keys:
            table.add_row(f"{key} {units.get(key, '')}".strip(),
                          *(f"{r[key]:.4g}" if key in r else "-" for r in results.values()))
        console.print(table)
        if json_out is not None:
            json_out.write_text(json.dumps(results, indent=2))
            console.print(f"metrics written to {json_out}")
