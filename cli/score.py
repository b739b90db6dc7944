"""`bayesal score`: rank a candidate pool by an acquisition function and select a batch."""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bayesal.cli._app import app, check_method, console, progress_bar, settings, user_errors


@app.command("score")
def score(
    model: Annotated[Path, typer.Option(help="Model directory from `bayesal train`.")],
    output: Annotated[Path, typer.Option(help="extxyz of the selected structures (with their "
                                         "scores in info).")],
    pool: Annotated[list[Path] | None, typer.Option(
        help="Candidate files (repeatable; read in chunks, any size).")] = None,
    pool_campaign: Annotated[str | None, typer.Option(
        help="Use the unlabelled structures of this database campaign as the pool.")] = None,
    acquisition: Annotated[str, typer.Option(
        help="bald-ef, bald-e, bald-f, energy-std, max-force-std or random.")] = "bald-ef",
    batch_size: Annotated[int, typer.Option(help="Structures to select.")] = 10,
    selection: Annotated[str, typer.Option(help="top-k or diverse.")] = "top-k",
    reduction: Annotated[str, typer.Option(
        help="Reduction of per-atom force BALD over atoms: sum, mean or max.")] = "sum",
    threshold: Annotated[float | None, typer.Option(
        help="Only structures scoring at least this are eligible.")] = None,
    scores: Annotated[Path | None, typer.Option(
        help="CSV with every candidate's score and components.")] = None,
    chunk_size: Annotated[int, typer.Option(help="Structures read and scored at once.")] = 256,
    keep: Annotated[int | None, typer.Option(
        help="Best candidates kept for the selection (default max(10 x batch, 100)).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random acquisition.")] = 0,
    method: Annotated[str | None, typer.Option(
        help="Expected posterior method (checked against the model).")] = None,
) -> None:
    """Score a pool by BALD (energy + forces) or a baseline and select a batch to label.

    Memory is flat in the pool size: candidates are scored chunk by chunk and only the best
    KEEP are held for the (top-k or batch-diverse) selection.
    """
    import itertools

    import ase.io

    from bayesal.bayes_model.acquisition import COMPONENTS, Acquisition, Reduction, Selection
    from bayesal.bayes_model.posterior import load_posterior
    from bayesal.bayes_model.scoring import score_pool
    from bayesal.db.export import atoms_extxyz

    with user_errors():
        for value, enum_ in ((acquisition, Acquisition), (selection, Selection),
                             (reduction, Reduction)):
            if value not in set(enum_):
                raise ValueError(f"{value!r} is not one of {', '.join(enum_)}")
        if not pool and not pool_campaign:
            raise ValueError("give candidate files with --pool or a campaign with "
                             "--pool-campaign")
        for path in pool or []:
            if not path.is_file():
                raise FileNotFoundError(f"pool file {path} does not exist")
        check_method(method, model)
        posterior = load_posterior(model)

        def from_files():
            for path in pool or []:
                for k, atoms in enumerate(ase.io.iread(path, index=":")):
                    atoms.info.update(source_file=str(path), source_frame=k)
                    yield atoms

        frames = from_files()
        if pool_campaign:
            from bayesal.db import make_engine
            from bayesal.db.pool import iter_unlabelled

            engine = make_engine(settings().database_url, readonly=True)
            frames = itertools.chain(frames, (a for _, a in iter_unlabelled(engine,
                                                                            pool_campaign)))
        writer = None
        files = contextlib.ExitStack()
        if scores is not None:
            scores.parent.mkdir(parents=True, exist_ok=True)
            writer = csv.writer(files.enter_context(scores.open("w", newline="")))
            writer.writerow(["index", "source_file", "source_frame", "structure_id",
                             "n_atoms", "score", *COMPONENTS])
        with files, progress_bar("structures") as bar:
            task = bar.add_task(f"scoring ({acquisition})", total=None)

            def on_scores(first: int, chunk, s) -> None:
                if writer is not None:
                    values = s.as_dict()
                    for j, atoms in enumerate(chunk):
                        writer.writerow([first + j, atoms.info.get("source_file", ""),
                                         atoms.info.get("source_frame", ""),
                                         atoms.info.get("structure_id", ""), len(atoms),
                                         *(f"{values[c][j]:.8g}" for c in
                                           ("score", *COMPONENTS))])
                bar.update(task, advance=len(chunk))

            result = score_pool(posterior, frames, batch_size, acquisition=acquisition,
                                reduction=reduction, selection=selection,
                                threshold=threshold, chunk_size=chunk_size, keep=keep,
                                seed=seed, on_scores=on_scores)
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w") as out:
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
        if len(result.selected) < batch_size:
            console.print(f"only {len(result.selected)} candidates were eligible"
                          + (f" (threshold {threshold})" if threshold is not None else ""))
        console.print(f"wrote {output}" + (f" and {scores}" if scores else ""))
