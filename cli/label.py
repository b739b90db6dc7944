"""`bayesal label`: DFT labels for a file of structures, optionally stored in a campaign."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bayesal.cli._app import (
    Reporter,
    app,
    console,
    read_frames,
    settings,
    user_errors,
    writer_engine,
)
from bayesal.labelers.config import LabelerConfig, LabelerKind

_D = {name: f.default for name, f in LabelerConfig.model_fields.items()}  # one set of defaults


@app.command("label")
def label(
    input: Annotated[Path, typer.Option("--input", help="Structures to label (extxyz or any "
                                        "ASE-readable file).")],
    output: Annotated[Path, typer.Option(help="extxyz with REF_energy (eV) and REF_forces "
                                         "(eV/Å) of the labelled frames; failed frames go to "
                                         "OUTPUT.failed.xyz.")],
    kind: Annotated[LabelerKind, typer.Option(
        help="pyscf (DFT/HF), xtb (GFN-xTB through tblite) or ase (any ASE calculator: "
             "--calculator).")] = LabelerKind.PYSCF,
    method: Annotated[str | None, typer.Option(
        help="pyscf: hf or a DFT functional (pbe, b3lyp, ...; default pbe); xtb: gfn2-xtb "
             "(default) or gfn1-xtb; ase: an optional name stored with the labels.")
    ] = _D["method"],
    basis: Annotated[str | None, typer.Option(
        help="pyscf: basis set (def2-svp, 6-31g*, sto-3g, ...; default def2-svp); ase: an "
             "optional name stored with the labels.")] = _D["basis"],
    calculator: Annotated[str | None, typer.Option(
        help="--kind ase: import path of the ASE calculator class, e.g. "
             "ase.calculators.orca.ORCA.")] = None,
    parameter: Annotated[list[str] | None, typer.Option(
        "--parameter", "-p",
        help="--kind ase/xtb: a calculator keyword as KEY=VALUE (VALUE read as YAML: "
             "numbers, strings, lists); repeat for several.")] = None,
    command: Annotated[str | None, typer.Option(
        help="--kind ase: the program's command line (ORCA, VASP, CP2K); default: ASE's "
             "configuration.")] = None,
    dispersion: Annotated[str, typer.Option(help="none, d3bj, d3zero, d4, ...")
                          ] = _D["dispersion"],
    charge: Annotated[int, typer.Option(help="Total charge.")] = _D["charge"],
    multiplicity: Annotated[int, typer.Option(help="Spin multiplicity 2S+1 (1: restricted).")
                            ] = _D["multiplicity"],
    workers: Annotated[int, typer.Option(help="Calculations in parallel.")] = 1,
    threads: Annotated[int, typer.Option(help="Threads per calculation.")] = _D["threads"],
    timeout: Annotated[float, typer.Option(help="Wall-time limit per calculation, s.")
                       ] = _D["timeout_s"],
    max_memory: Annotated[int, typer.Option(help="Memory per calculation, MB.")
                          ] = _D["max_memory_mb"],
    grid_level: Annotated[int, typer.Option(help="DFT grid level (0-9).")] = _D["grid_level"],
    density_fit: Annotated[bool, typer.Option(help="Density fitting (RI).")
                           ] = _D["density_fit"],
    backend: Annotated[str, typer.Option(help="cpu, gpu (gpu4pyscf) or auto.")
                       ] = _D["backend"].value,
    guess_dir: Annotated[Path | None, typer.Option(
        help="Reuse converged densities of similar structures as initial guesses, kept here "
             "(default with --campaign: BAYESAL_DATA_DIR/scf-guesses).")] = None,
    campaign: Annotated[str | None, typer.Option(
        help="Also store structures and labels in this campaign (each label as it finishes; "
             "structures already labelled with these settings are not computed again).")
    ] = None,
    source: Annotated[str, typer.Option(help="Source of new structures in --campaign.")
                      ] = "pool",
) -> None:
    """Label structures with PySCF, xTB or any ASE calculator (energies in eV, forces in
    eV/Å).

    Every frame is checked before any calculation (charge/multiplicity, basis coverage,
    geometry), and the program an ASE calculator runs is looked up first. Each calculation
    runs in its own process under --timeout; PySCF's SCF failures walk a recovery ladder;
    failures are reported, never dropped.
    """

    from bayesal.db.export import atoms_extxyz
    from bayesal.db.readers import InputError, InputIssue
    from bayesal.labelers import LabelerInputError

    with user_errors(options={"timeout_s": "timeout", "max_memory_mb": "max-memory"}):
        images = read_frames([input])  # all valid: image i is frame i of the file
        cfg = settings()
        if guess_dir is None and campaign is not None:
            guess_dir = cfg.scf_guess_dir
        labeler_options = dict(  # options of another kind than --kind are refused there
            kind=kind, method=method, basis=basis, charge=charge, multiplicity=multiplicity,
            threads=threads, max_memory_mb=max_memory, timeout_s=timeout,
            dispersion=dispersion, density_fit=density_fit, grid_level=grid_level,
            backend=backend, calculator=calculator, command=command,
            parameters=_parameters(parameter or []))
        labeler = LabelerConfig(**labeler_options).build(guess_dir)
        try:
            labeler.validate(images)
        except LabelerInputError as exc:  # name the file and the frame in it
            raise InputError([InputIssue(str(input), i, None, msg)
                              for i, msg in exc.problems]) from None

        results: dict[int, tuple[str, float | None, object, str | None, float | None]] = {}
        engine = None
        todo = list(range(len(images)))
        if campaign is not None:
            from bayesal.db.pool import existing_labels

            engine = writer_engine(cfg)
            from bayesal.db import ensure_schema

            ensure_schema(engine, create=True)
            done = existing_labels(engine, campaign, images, labeler.settings_hash)
            for i, lab in done.items():
                results[i] = ("ok", lab.energy, lab.forces, None, None)
            todo = [i for i in todo if i not in done]
            if done:
                console.print(f"{len(done)} of {len(images)} structures already labelled "
                              f"with these settings in campaign {campaign}; not recomputed")

        with Reporter("labelling", "labels", total=len(todo)) as progress:

            def on_result(k: int, res) -> None:
                i = todo[k]
                results[i] = (res.status, res.energy, res.forces, res.error, res.wall_s)
                if engine is not None:
                    from bayesal.tasks.labeling import store_results

                    store_results(engine, campaign, labeler, [(images[i], res)], source=source)
                progress.advance()

            labeler.label_many([images[i] for i in todo], workers=workers, on_result=on_result)

        _write_outputs(images, results, output, atoms_extxyz)
        _summary(results, todo, output)
        if todo and not any(results[i][0] == "ok" for i in todo):
            raise typer.Exit(1)  # every calculation failed: a job script must notice


def _parameters(items: list[str]) -> dict:
    """``KEY=VALUE`` options as calculator keywords (values read as YAML scalars/lists)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--parameter {item!r}: write KEY=VALUE, e.g. accuracy=0.1")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _write_outputs(images, results, output: Path, atoms_extxyz) -> None:

    output.parent.mkdir(parents=True, exist_ok=True)
    failed = output.with_name(output.stem + ".failed.xyz")
    n_failed = 0
    with open(output, "w") as ok_fh, open(failed, "w") as bad_fh:
        for i, atoms in enumerate(images):
            status, energy, forces, error, _ = results[i]
            info = {k: v for k, v in atoms.info.items() if isinstance(v, int | float | str)}
            info["frame"] = i
            if status == "ok":
                info["REF_energy"] = energy
                ok_fh.write(atoms_extxyz(atoms, info, {"REF_forces": forces}))
            else:
                n_failed += 1
                info.update(label_status=status, label_error=(error or "")[:300])
                bad_fh.write(atoms_extxyz(atoms, info, {}))
    if n_failed == 0:
        failed.unlink()


def _summary(results, computed: list[int], output: Path) -> None:
    counts: dict[str, int] = {}
    for status, *_ in results.values():
        counts[status] = counts.get(status, 0) + 1
    seconds = [results[i][4] for i in computed if results[i][4] is not None]
    table = Table(title="labels")
    for col in ("status", "count"):
        table.add_column(col)
    for status in ("ok", "scf_failed", "timeout", "error"):
        if counts.get(status):
            table.add_row(status, str(counts[status]))
    console.print(table)
    if seconds:
        console.print(f"computed {len(seconds)} labels, mean {sum(seconds) / len(seconds):.2f} "
                      "s per label")
    reasons = {results[i][3] for i in results if results[i][0] != "ok"}
    for reason in sorted(r for r in reasons if r)[:5]:
        console.print(f"  failure: {reason.splitlines()[0][:160]}", markup=False)
    console.print(f"wrote {counts.get('ok', 0)} labelled structures to {output}")
