"""Data commands: db upgrade/current, import, export, status, sql."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from bayesal.cli._app import (
    Reporter,
    app,
    atomic_output,
    console,
    db_app,
    settings,
    user_errors,
    writer_engine,
)


# ---------------------------------------------------------------- db
@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Create or upgrade the database schema to the current version."""
    from bayesal.db import make_engine, upgrade

    with user_errors():
        cfg = settings()
        engine = make_engine(cfg.database_url)
        try:
            reached = upgrade(engine, revision)
        finally:
            engine.dispose()
        from bayesal.db.engine import redact_url

        where = redact_url(engine.url)
        console.print(f"database {where} is at revision {reached}")


@db_app.command("current")
def db_current() -> None:
    """Show the database's schema revision and the one this bayesal needs."""
    from bayesal.db import current_revision, head_revision, readonly_engine

    with user_errors():
        engine = readonly_engine(settings().database_url)
        try:
            current = current_revision(engine)
        finally:
            engine.dispose()
        console.print(f"database: {current or 'no schema'}; bayesal needs: {head_revision()}")


# ---------------------------------------------------------------- import / export
@app.command("import")
def import_(
    files: Annotated[list[Path], typer.Argument(help="extxyz or any ASE-readable files.",
                                                show_default=False)],
    campaign: Annotated[str, typer.Option(help="Campaign name (created if new).")],
    source: Annotated[str, typer.Option(
        help="What the structures are for: initial, pool, explored or test.")] = "pool",
    labelled: Annotated[bool, typer.Option(
        "--labelled", help="Also store the energies and forces in the files as reference labels.")
    ] = False,
    method: Annotated[str, typer.Option(
        help="Level of theory of --labelled data (e.g. pbe); labels with the same method and "
             "basis are comparable.")] = "unknown",
    basis: Annotated[str, typer.Option(help="Basis set of --labelled data.")] = "unknown",
    energy_key: Annotated[str | None, typer.Option(
        help="info key of the energy (default: energy, REF_energy).")] = None,
    forces_key: Annotated[str | None, typer.Option(
        help="array key of the forces (default: forces, REF_forces).")] = None,
) -> None:
    """Import structures (and with --labelled their labels) into a campaign.

    All or nothing: any bad frame aborts the import with a list of problems and the
    database unchanged. Structures already present are reported as duplicates.
    """
    from bayesal.db import StructureSource
    from bayesal.db.importer import ReferenceLevel, import_files
    from bayesal.db.readers import count_frames

    with user_errors():
        try:
            src = StructureSource(source)
        except ValueError:
            raise ValueError(f"--source {source!r} is not one of "
                             f"{', '.join(s.value for s in StructureSource)}") from None
        cfg = settings()
        with Reporter("importing", "frames", total=count_frames(files)) as progress:
            report = import_files(
                writer_engine(cfg), files, campaign, source=src, labelled=labelled,
                level=ReferenceLevel(method, basis), energy_key=energy_key,
                forces_key=forces_key, on_frame=progress.update,
            )
        console.print(
            f"campaign {campaign}: {report.n_frames} frames read, "
            f"{report.n_structures_new} new structures, "
            f"{report.n_structures_duplicate} duplicates skipped"
            + (f", {report.n_labels_new} new labels ({report.n_labels_existing} already there)"
               if labelled else "")
        )


@app.command("export")
def export(
    campaign: Annotated[str, typer.Option(help="Campaign to export.")],
    output: Annotated[Path, typer.Option(help="Output file.")],
    format: Annotated[str, typer.Option(help="extxyz, csv or parquet.")] = "extxyz",
    settings_hash: Annotated[str | None, typer.Option(
        "--labeler-settings", "--settings-hash",
        help="Level of theory to export when a campaign has several: a settings hash (a "
             "unique prefix is enough; the error without it and SQL's label_levels view "
             "list them) or latest (that of the newest label).")] = None,
    include_unlabelled: Annotated[bool, typer.Option(
        "--include-unlabelled", help="Also write structures without an ok label.")] = False,
    energy_key: Annotated[str, typer.Option(help="extxyz info key for energies.")
    ] = "REF_energy",
    forces_key: Annotated[str, typer.Option(help="extxyz array key for forces.")
    ] = "REF_forces",
) -> None:
    """Export the labelled structures of a campaign (extxyz readable by ASE, MACE, NequIP)."""
    from bayesal.db.export import export_campaign

    with user_errors():
        cfg = settings()
        with Reporter("exporting", "structures") as progress:
            report = export_campaign(
                cfg.database_url, campaign, output, format, settings_hash=settings_hash,
                include_unlabelled=include_unlabelled, energy_key=energy_key,
                forces_key=forces_key, on_row=progress.update, on_total=progress.set_total,
            )
        console.print(f"wrote {report.n_structures} structures to {report.path}")


# ---------------------------------------------------------------- status / sql
@app.command("status")
def status(
    campaign: Annotated[str | None, typer.Option(help="Show one campaign in detail.")] = None,
) -> None:
    """Campaigns with structure, label and round counts; rounds of one campaign."""
    from bayesal.db.engine import readonly_session
    from bayesal.db.ingest import get_campaign
    from bayesal.db.queries import campaign_overview, label_failures, round_table

    with user_errors(), readonly_session(settings().database_url) as session:
        overview = campaign_overview(session)
        if campaign is not None:
            if get_campaign(session, campaign) is None:
                names = ", ".join(c["campaign"] for c in overview) or "none yet"
                raise ValueError(f"no campaign named {campaign!r}; existing: {names}")
            overview = [c for c in overview if c["campaign"] == campaign]
        table = Table(title="campaigns (ok/failed: labels)", box=box.SIMPLE_HEAD,
                      pad_edge=False, collapse_padding=True)
        table.add_column("campaign", overflow="fold")
        for col in ("structures", "ok", "failed", "rounds"):
            table.add_column(col, justify="right")
        table.add_column("by source", overflow="fold")
        table.add_column("created", no_wrap=True)
        for c in overview:
            table.add_row(
                c["campaign"], str(c["n_structures"]), str(c["n_ok"]), str(c["n_failed"]),
                str(c["n_rounds"]),
                ", ".join(f"{k} {v}" for k, v in sorted(c["structures"].items())),
                f"{c['created_at']:%Y-%m-%d}",
            )
        if not overview:
            console.print("no campaigns yet: start one with `bayesal import FILE --campaign "
                          "NAME` (see README)")
            return
        console.print(table)
        if campaign is None:
            return
        rounds = round_table(session, campaign)
        if rounds:
            rt = Table(title=f"rounds of {campaign} (ok/failed: labels; min: wall time)",
                       box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
            for col in ("round", "status", "ok", "failed", "scored", "selected", "models"):
                rt.add_column(col, justify="right" if col != "status" else "left")
            rt.add_column("started", no_wrap=True)
            rt.add_column("min", justify="right")
            for r in rounds:
                start, end = r["started_at"], r["finished_at"]
                minutes = f"{(end - start).total_seconds() / 60:.1f}" if start and end else ""
                rt.add_row(str(r["round_index"]), r["status"], str(r["n_ok"]),
                           str(r["n_failed"]), str(r["n_scored"]), str(r["n_selected"]),
                           str(r["n_models"]), f"{start:%m-%d %H:%M}" if start else "",
                           minutes)
            console.print(rt)
            from bayesal.cli.campaign import print_round_metrics

            print_round_metrics(campaign)
        else:
            console.print(f"{campaign}: no active-learning rounds yet")
        failures = label_failures(session, campaign)
        if failures:
            ft = Table(title="failed labels", box=box.SIMPLE_HEAD, pad_edge=False,
                       collapse_padding=True)
            ft.add_column("status")
            ft.add_column("reason", overflow="fold")
            ft.add_column("count", justify="right")
            for f in failures:
                ft.add_row(f["status"], (f["error"] or "")[:100], str(f["n"]))
            console.print(ft)


def _cell(value, for_csv: bool):
    from bayesal.db.arrays import ArrayEncodingError, decode_array

    if isinstance(value, bytes | memoryview):
        try:
            arr = decode_array(value)
        except ArrayEncodingError:
            return f"<{len(bytes(value))} bytes>"
        return json.dumps(arr.tolist()) if for_csv else f"<array {arr.shape}>"
    if isinstance(value, dict | list):
        return json.dumps(value)
    if for_csv:
        from bayesal.db.export import csv_safe

        return "" if value is None else csv_safe(value)
    return str(value)


@app.command("sql")
def sql(
    query: Annotated[str, typer.Argument(help="One read-only SQL query.", show_default=False)],
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV instead of a table.")] = False,
    parquet: Annotated[Path | None, typer.Option(
        "--parquet", help="Write the rows to this Parquet file (arrays as lists of numbers).",
        show_default=False)] = None,
    max_rows: Annotated[int, typer.Option(help="Most rows shown in a table (0: all).")] = 200,
) -> None:
    """Run a read-only SQL query (writes are refused by the database itself).

    Views for everyday questions: labelled_data, round_summary, label_failures,
    label_levels; tables: campaigns, structures, labels, rounds, models, scores. Arrays
    print as shapes, or as JSON lists with --csv. Rows stream from the database a thousand
    at a time, so --csv, --parquet and --max-rows 0 (tables of 1,000 rows each) use the
    same memory for a million rows as for ten.
    """
    import csv as csv_mod

    from bayesal.db.engine import ensure_schema, readonly_engine
    from bayesal.db.queries import stream_readonly_sql, write_parquet

    with user_errors():
        if csv and parquet is not None:
            raise ValueError("choose one of --csv and --parquet")
        url = settings().database_url
        engine = readonly_engine(url)
        try:
            ensure_schema(engine)
        finally:
            engine.dispose()
        with stream_readonly_sql(url, query) as (columns, batches):
            if parquet is not None:  # written aside, renamed when complete
                with atomic_output(parquet) as part:
                    n = write_parquet(columns, batches, part)
                console.print(f"{n} row{'s' if n != 1 else ''} written to {parquet}")
                return
            if csv:
                writer = csv_mod.writer(sys.stdout)
                writer.writerow(columns)
                for batch in batches:
                    writer.writerows([_cell(v, True) for v in row] for row in batch)
                return
            _print_tables(columns, batches, max_rows)


def _print_tables(columns: list[str], batches, max_rows: int) -> None:
    """Rows as tables of one streamed batch each (one table when they fit), at most
    ``max_rows`` (0: all), then the count."""

    def table_of(rows) -> Table:
        table = Table()
        for col in columns:
            table.add_column(col)
        for row in rows:
            table.add_row(*(_cell(v, False) for v in row))
        return table

    shown, more = 0, False
    for batch in batches:
        if max_rows and shown + len(batch) > max_rows:
            batch, more = batch[:max_rows - shown], True
        if batch:
            console.print(table_of(batch))
            shown += len(batch)
        if more:
            break
    if not shown and columns:
        console.print(table_of([]))
    console.print(f"{shown} row{'s' if shown != 1 else ''}"
                  + (" shown (more exist; raise --max-rows or use --csv)" if more else ""))
