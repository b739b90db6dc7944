"""`bayesal score`: rank a candidate pool by an acquisition function and select a batch."""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bayesal.bayes_model.acquisition import AcquisitionConfig
from bayesal.cli._app import (
    DeviceOption,
    KernelsOption,
    Reporter,
    SeveralAfterOneFlag,
    app,
    atomic_output,
    console,
    iter_checked_frames,
    load_model_on,
    settings,
    user_errors,
)

_D = {name: f.default for name, f in AcquisitionConfig.model_fields.items()}


@app.command("score", cls=SeveralAfterOneFlag)
def score(
    model: Annotated[Path, typer.Option(help="Model directory from `bayesal train`.")],
    output: Annotated[Path, typer.Option(help="extxyz of the selected structures (with their "
                                         "scores in info).")],
    pool: Annotated[list[Path] | None, typer.Option(
        help="Candidate files (repeatable; read in chunks, any size).")] = None,
    pool_campaign: Annotated[str | None, typer.Option(
        help="Use the unlabelled structures of this database campaign as the pool.")] = None,
    acquisition: Annotated[str, typer.Option(
        help="bald-ef, bald-e, bald-f, energy-std, max-force-std, trust-window (DP-GEN: at "
             "random among candidates with max-force-std in [--trust-lo, --trust-hi)) or "
             "random.")
    ] = _D["function"].value,
    n_select: Annotated[int, typer.Option(
        "--n-select", "--batch-size", help="Structures to select (--batch-size: the old "
        "name).")] = _D["n_select"],
    selection: Annotated[str, typer.Option(
        help="diverse (batch-diverse: greedy joint information), top-k, or power (drawn at "
             "random with probability proportional to score^--power-beta).")
    ] = _D["selection"].value,
    power_beta: Annotated[float, typer.Option(
        help="power selection: the exponent of the score (higher: closer to top-k).")
    ] = _D["power_beta"],
    reduction: Annotated[str, typer.Option(
        help="Reduction of per-atom force BALD over atoms: sum, mean or max.")
    ] = _D["reduction"].value,
    threshold: Annotated[float | None, typer.Option(
        help="Only structures scoring at least this are eligible.")] = None,
    scores: Annotated[Path | None, typer.Option(
        help="CSV with every candidate's score and components.")] = None,
    chunk_size: Annotated[int, typer.Option(help="Structures read and scored at once.")
                          ] = _D["chunk_size"],
    predict_batch: Annotated[int, typer.Option(help="Structures per forward pass.")
                             ] = _D["predict_batch"],
    keep: Annotated[int | None, typer.Option(
        help="Best candidates kept for the selection (default max(10 x n-select, 100)).")
    ] = None,
    trust_lo: Annotated[float, typer.Option(
        help="trust-window: lower bound of max-force-std, eV/Å.")] = _D["trust_lo"],
    trust_hi: Annotated[float, typer.Option(
        help="trust-window: upper bound of max-force-std, eV/Å.")] = _D["trust_hi"],
    max_force_std_cap: Annotated[float | None, typer.Option(
        help="Any acquisition: candidates with max-force-std above this (eV/Å) are not "
             "selected (DP-GEN's upper trust level); lifted when none is within it.")
    ] = _D["max_force_std_cap"],
    seed: Annotated[int, typer.Option(help="Seed of the random and trust-window "
                                            "acquisitions and the power selection.")] = 0,
    method: Annotated[str | None, typer.Option(
        help="Expected posterior method (checked against the model).")] = None,
    device: DeviceOption = "auto",
    kernels: KernelsOption = "e3nn",
) -> None:
    """Score a pool by BALD (energy + forces) or a baseline and select a batch to label.

    Memory is flat in the pool size: candidates are scored chunk by chunk and only the best
    KEEP are held for the (top-k, batch-diverse or power) selection.
    """
    import itertools

    from bayesal.bayes_model.acquisition import COMPONENTS
    from bayesal.bayes_model.scoring import score_pool
    from bayesal.db.export import atoms_extxyz
    from bayesal.db.readers import count_frames

    with user_errors(options={"function": "acquisition"}):
        config = AcquisitionConfig(function=acquisition, n_select=n_select,
                                   selection=selection, reduction=reduction,
                                   threshold=threshold, keep=keep, chunk_size=chunk_size,
                                   predict_batch=predict_batch, trust_lo=trust_lo,
                                   trust_hi=trust_hi, max_force_std_cap=max_force_std_cap,
                                   power_beta=power_beta)
        if not pool and not pool_campaign:
            raise ValueError("give candidate files with --pool or a campaign with "
                             "--pool-campaign")
        for path in pool or []:
            if not path.is_file():
                raise FileNotFoundError(f"pool file {path} does not exist")
        posterior = load_model_on(model, device, method, kernels)
        frames = iter_checked_frames(pool or [])  # a bad frame stops before any output
        if pool_campaign:
            from bayesal.db import make_engine
            from bayesal.db.pool import iter_unlabelled

            engine = make_engine(settings().database_url, readonly=True)
            frames = itertools.chain(frames, (a for _, a in iter_unlabelled(engine,
                                                                            pool_campaign)))
        writer = None
        files = contextlib.ExitStack()  # outputs appear only when everything succeeded
        selected_part = files.enter_context(atomic_output(output))
        if scores is not None:
            scores_part = files.enter_context(atomic_output(scores))
            writer = csv.writer(files.enter_context(scores_part.open("w", newline="")))
            writer.writerow(["index", "source_file", "source_frame", "structure_id",
                             "n_atoms", "score", *COMPONENTS])
        total = None if pool_campaign else count_frames(pool or [])
        with files, Reporter(f"scoring ({acquisition})", "structures", total=total) as bar:

            def on_scores(first: int, chunk, s) -> None:
                if writer is not None:
                    values = s.as_dict()
                    for j, atoms in enumerate(chunk):
                        writer.writerow([first + j, atoms.info.get("source_file", ""),
                                         atoms.info.get("source_frame", ""),
                                         atoms.info.get("structure_id", ""), len(atoms),
                                         *(f"{values[c][j]:.8g}" for c in
                                           ("score", *COMPONENTS))])
                bar.advance(len(chunk))

            result = score_pool(posterior, frames, config, seed=seed, on_scores=on_scores)
            with open(selected_part, "w") as out:
                for rank, cand in enumerate(result.selected):
                    atoms = cand.atoms
                    info = {k: v for k, v in atoms.info.items()
                            if isinstance(v, int | float | str) and not isinstance(v, bool)}
                    info.update(cand.components)
                    info.update(acquisition=acquisition, score=cand.score, rank=rank,
                                pool_index=cand.index)
                    out.write(atoms_extxyz(atoms, info, {}))
        table = Table(title=f"selected {len(result.selected)} of {result.n_scored} "
                            f"({acquisition}, {selection})")
        for col in ("rank", "pool index", "score", "bald_e", "bald_f", "energy_std eV",
                    "max_force_std eV/Å"):
            table.add_column(col, justify="right")
        for rank, c in enumerate(result.selected[:20]):
            table.add_row(str(rank), str(c.index), f"{c.score:.4g}",
                          *(f"{c.components[k]:.4g}" for k in COMPONENTS))
        console.print(table)
        if len(result.selected) < n_select:
            console.print(f"only {len(result.selected)} candidates were eligible"
                          + (f" (threshold {threshold})" if threshold is not None else ""))
        console.print(f"wrote {output}" + (f" and {scores}" if scores else ""))
