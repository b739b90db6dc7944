"""`bayesal doctor`: what an interrupted run left behind, and what --resume does with it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from bayesal.cli._app import app, console, settings, user_errors

EPHEMERAL_ENV = "PREFECT__SERVER_EPHEMERAL"  # set by Prefect in its temporary API's process


def stale_temporary_apis() -> list[Any]:
    """Prefect temporary API servers of this user whose starter is gone: Prefect starts them
    from a Python process (``bayesal run``, a worker, a script) and stops them when it ends;
    one whose parent is no longer a Python process (adopted by init or a subreaper) was left
    by a killed run."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "ppid", "uids", "cmdline"]):
        try:
            if ("prefect.server.api.server:create_app" not in " ".join(proc.info["cmdline"] or [])
                    or proc.info["uids"].real != os.getuid()
                    or proc.environ().get(EPHEMERAL_ENV) != "1"):  # not `prefect server start`
                continue
            ppid = proc.info["ppid"]
            parent = psutil.Process(ppid) if ppid and ppid != 1 else None
            if parent is None or "python" not in " ".join(parent.cmdline()[:1]).lower():
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def campaign_findings(name: str, rounds: list[dict[str, Any]], folder: Path,
                      holder: dict[str, Any] | None) -> list[str]:
    """One sentence per leftover of an interrupted run of campaign ``name`` (none: [])."""
    if holder is not None:
        return [f"running now: process {holder.get('pid')} on {holder.get('host')} (since "
                f"{holder.get('started', '?')}); nothing to repair while it runs"]
    out = []
    for r in rounds:
        if r["status"] != "running":
            continue
        k = r["round_index"]
        start = r["started_at"]
        since = f" since {start:%Y-%m-%d %H:%M}" if start else ""
        out.append(f"round {k} is marked running{since} but no process runs the campaign: "
                   "`bayesal run CONFIG --resume` continues it from its last complete step "
                   "(the round keeps its index and is counted once)")
        labelled = r["n_ok"] + r["n_failed"]
        if r["n_selected"] > labelled:
            out.append(f"round {k}: {r['n_selected'] - labelled} of {r['n_selected']} "
                       "selected structures have no label yet: --resume labels them (the "
                       "stored selection is kept, finished labels are never redone)")
        elif r["n_selected"] == 0 and r["n_scored"] > 0:
            out.append(f"round {k}: {r['n_scored']} candidates scored, none selected yet: "
                       "--resume scores the pool again and selects once")
        model = folder / f"round-{k:03d}" / "model"
        if r["n_models"] == 0 and model.is_dir():
            out.append(f"round {k}: {model} holds training state but no registered model: "
                       "--resume continues training from the saved state")
    known = {r["round_index"] for r in rounds}
    for path in sorted(folder.glob("round-*")):
        try:
            k = int(path.name.removeprefix("round-"))
        except ValueError:
            continue
        if k not in known:
            out.append(f"{path} belongs to no round of the database (a database reset or "
                       "another database?): --resume ignores it; delete it by hand if unwanted")
    return out


@app.command("doctor")
def doctor(
    campaign: Annotated[str | None, typer.Option(
        help="Check one campaign (default: every campaign in the database).")] = None,
    fix: Annotated[bool, typer.Option(
        "--fix", help="Stop stale temporary Prefect API servers of this user (the one repair "
                      "that is always safe; --resume repairs the rest).")] = False,
) -> None:
    """What a crash or kill may have left: rounds stuck 'running' with no live process,
    selected structures without labels, model directories without a registered model,
    stale temporary Prefect API servers of this user; and what --resume does with each."""
    from bayesal.db.engine import readonly_session
    from bayesal.db.pool import campaign_id
    from bayesal.db.queries import campaign_overview, round_table
    from bayesal.flows.run_lock import lock_holder

    with user_errors(), readonly_session(settings().database_url) as session:
        if campaign is not None:
            campaign_id(session, campaign)  # an unknown name: the error lists the existing
            names = [campaign]
        else:
            names = [c["campaign"] for c in campaign_overview(session)]
        problems = 0
        for name in names:
            folder = settings().campaign_dir(name)
            findings = campaign_findings(name, round_table(session, name), folder,
                                         lock_holder(folder))
            for line in findings:
                console.print(f"{name}: {line}", soft_wrap=True)
            problems += sum(not f.startswith("running now") for f in findings)
    stale = stale_temporary_apis()
    for proc in stale:
        action = "stopping it" if fix else "--fix stops it"
        console.print(f"stale temporary Prefect API server: process {proc.pid} "
                      f"({' '.join(proc.cmdline()[-8:])}), left by a killed run: {action}",
                      soft_wrap=True)
        if fix:
            proc.terminate()
    if fix and stale:
        import psutil

        _, alive = psutil.wait_procs(stale, timeout=10)
        for proc in alive:
            proc.kill()
    if not problems and not stale:
        console.print("nothing left behind by an interrupted run"
                      + (f" of campaign {campaign}" if campaign else ""))
