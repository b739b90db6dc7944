"""Campaign commands: run (or resume) a campaign, deploy it to a Prefect work pool."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bayesal.cli._app import (
    DEVICE_OPTION_HELP,
    KERNELS_OPTION_HELP,
    app,
    console,
    settings,
    user_errors,
    writer_engine,
)


def _prefect_defaults() -> None:
    # Prefect's local server sends telemetry heartbeats that fail noisily on a busy SQLite
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Its temporary API gets 20 s to start by default; a first start (database migrations) on
    # a busy 2-core machine can take longer (seen in CI): allow 2 minutes.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _check_new(cfg, resume: bool) -> None:
    from bayesal.db import ensure_schema
    from bayesal.tasks.policy import check_new_campaign

    engine = writer_engine(settings())
    ensure_schema(engine, create=True)
    try:
        check_new_campaign(engine, cfg.name, resume)
    finally:
        engine.dispose()


@app.command("run")
def run(
    config: Annotated[Path, typer.Argument(help="Campaign YAML (see docs/campaign.md).")],
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue a campaign that is already in the database (after a "
                         "crash, or with a raised max_rounds/label_budget).")] = False,
    device: Annotated[str | None, typer.Option(
        help=DEVICE_OPTION_HELP + " Default: the campaign's device (auto).",
        show_default=False)] = None,
    kernels: Annotated[str | None, typer.Option(
        help=KERNELS_OPTION_HELP + " Default: the campaign's kernels (e3nn).",
        show_default=False)] = None,
) -> None:
    """Run an active-learning campaign until one of its stopping rules holds.

    Rounds of train -> evaluate -> score -> select -> label -> store, as Prefect flows
    (Prefect's local API unless PREFECT_API_URL points at a server).
    Everything is stored as it happens: after an interruption, the same command with
    --resume continues from the last complete step without labelling anything twice.
    """
    from bayesal.flows.campaign_config import load_campaign_config

    with user_errors():
        cfg = load_campaign_config(config)  # nothing is written before the config is valid
        if not resume:  # a bad frame: one line naming it, before anything is written
            from bayesal.db.readers import check_files

            d = cfg.data
            check_files([*d.pool_files, *d.initial_files, *d.test_files])
        cfg.labeler.build()  # an unknown functional or basis: one line, before Prefect starts
        from bayesal.bayes_model.device import resolve_device

        if device is not None or kernels is not None:  # validated like the YAML's values
            from bayesal.bayes_model.device import check_device
            from bayesal.bayes_model.kernels import check_kernels

            cfg = cfg.model_copy(update={"device": check_device(device or cfg.device,
                                                                "--device"),
                                         "kernels": check_kernels(kernels or cfg.kernels)})
        resolve_device(cfg.device, what="--device" if device else f"{config}: device")
        _check_new(cfg, resume)
        _check_not_running(cfg.name)
        _exit_on_sigterm(config)
        _prefect_defaults()
        _temporary_api_dies_with_us()
        from bayesal.flows.campaign import campaign

        result = campaign(str(config.resolve()), resume=True, device=device,
                          kernels=kernels)
        console.print(f"campaign {cfg.name} stopped after {result['rounds']} "
                      f"round(s): {result['stop_reason']}")
        print_round_metrics(cfg.name)
        from bayesal.db.engine import redact_url

        url = settings().database_url
        console.print(
            "\nwhere to look:\n"
            f"  bayesal status --campaign {cfg.name}\n"
            f"  bayesal sql \"SELECT round_index, status, n_ok, n_failed FROM round_summary "
            f"WHERE campaign = '{cfg.name}'\"\n"
            f"  bayesal sql \"SELECT formula, energy, max_force, labeler, method, basis FROM "
            f"labelled_data WHERE campaign = '{cfg.name}' LIMIT 10\"\n"
            f"  bayesal export --campaign {cfg.name} --output {cfg.name}.xyz\n"
            f"  bayesal dashboard --campaign {cfg.name}\n"
            f"  database: {redact_url(url)}; models: {settings().campaign_dir(cfg.name)}/",
            markup=False, highlight=False, soft_wrap=True)


def _check_not_running(name: str) -> None:
    """Refuse, before Prefect starts, a campaign another process is running now (the flow
    checks again under its lock)."""
    from bayesal.flows.run_lock import check_not_running

    check_not_running(settings().campaign_dir(name), name)


def _exit_on_sigterm(config: Path) -> None:
    """SIGTERM (scancel, kill) and SIGINT (Ctrl-C) end the run with exit status 143 / 130:
    Prefect marks the runs crashed and re-sends the signal to this handler, whose SystemExit
    unwinds normally, so the temporary Prefect API, the labeler workers and the ensemble
    members are stopped (the default action would kill this process alone and orphan them).
    A signal to the whole process group (what scancel and a terminal's Ctrl-C send) reaches
    the workers too, but not the temporary API, which runs in a session of its own so that
    the crashed runs can still be recorded."""
    import signal
    import sys

    def stop(signum: int, frame) -> None:
        print(f"\nstopped by {signal.Signals(signum).name}; everything finished so far is "
              f"stored: continue with `bayesal run {config} --resume`", file=sys.stderr,
              flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


# Runs beside `bayesal run` (argv: its pid, the server's pid), in its own session so that a
# signal to run's process group does not reach it: once `run` is gone without having stopped
# the server (SIGKILL, the OOM killer), stop the server too.
_REAPER = """
import os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
while os.getppid() == parent and alive(server):
    time.sleep(0.5)
if alive(server):
    os.kill(server, signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.1)
        if not alive(server):
            break
    else:
        os.kill(server, signal.SIGKILL)
"""


def _temporary_api_dies_with_us() -> None:
    """Without PREFECT_API_URL, Prefect serves the flows from a temporary API in a
    subprocess that it stops at exit, which a SIGKILL (OOM killer, scancel after its grace
    period) skips, leaving the server running. Start that server now, as Prefect would on the
    first flow call (it is a singleton, so Prefect reuses it), in a session of its own (a
    signal to our process group must not kill it before the runs are marked crashed), and
    start the reaper that stops it once this process is gone the moment the server process
    exists, before waiting for it to answer (a kill during its start-up must not orphan it)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    _reaped_server_class()().start()


def _reaped_server_class():
    import signal
    import subprocess
    import sys

    from prefect.server.api.server import SubprocessASGIServer

    from bayesal.contracts import parent_death_hook

    terminate_with_us = parent_death_hook(signal.SIGTERM)

    class ReapedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            popen = subprocess.Popen

            def own_session(*args, **kwargs):
                # its own session (a signal to our group must not stop it before the runs
                # are marked crashed) and SIGTERM from Linux the instant we die, even
                # before the reaper below exists (PR_SET_PDEATHSIG, set before exec; the
                # thread that starts it is the main thread, whose end is the process's)
                return popen(*args, **kwargs, start_new_session=True,
                             preexec_fn=terminate_with_us)

            subprocess.Popen = own_session  # Prefect builds the server's command line
            try:
                server = super()._run_uvicorn_command()
            finally:
                subprocess.Popen = popen
            popen([sys.executable, "-c", _REAPER, str(os.getpid()), str(server.pid)],
                  stdin=subprocess.DEVNULL, start_new_session=True)
            return server

    return ReapedServer


# (row key, header: one word a line so that the table fits 80 columns, display factor)
CLI_COLUMNS = (
    ("round", "round", None), ("train labels", "train\nlabels", None),
    ("new ok", "new\nok", None),
    ("failed", "failed", None), ("test F MAE eV/Å", "F MAE\nmeV/Å", 1000.0),
    ("test E MAE eV", "E MAE\nmeV", 1000.0), ("test F NLL", "F NLL", 1.0),
    ("val F MAE eV/Å", "val F\nmeV/Å", 1000.0), ("selected mean score", "score", 1.0),
    ("round s", "time\ns", 1.0),
)


def _cell(value, factor: float | None) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "" if value is None else str(value)
    if factor is None:
        return str(value)
    value *= factor
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def round_metrics_table(campaign: str, rows: list[dict]) -> Table:
    """The learning curve as a table that fits 80 columns (units in the headers, 3
    significant digits; columns without values left out)."""
    from rich import box

    table = Table(title=f"learning curve of {campaign}: test-set errors after each round's "
                        "training; val F: validation force MAE; score: mean acquisition score "
                        "of the batch the round selected",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    keys = [c for c in CLI_COLUMNS if any(r.get(c[0]) not in ("", None) for r in rows)]
    for _, header, _ in keys:
        table.add_column(header, justify="right")
    for r in rows:
        table.add_row(*(_cell(r.get(k), factor) for k, _, factor in keys))
    return table


def learning_verdict(rows: list[dict]) -> str | None:
    """One sentence on the learning curve: first vs last round's test force MAE (validation
    MAE without a test set), their ratio and how many rounds improved on the one before."""
    curves = {what: (key, [r for r in rows if isinstance(r.get(key), int | float)])
              for key, what in (("test F MAE eV/Å", "test"), ("val F MAE eV/Å", "validation"))}
    what = next((w for w, (_, c) in curves.items() if len(c) >= 2), None)
    if what is None:
        return None
    key, curve = curves[what]
    first, last = curve[0], curve[-1]
    ratio = last[key] / first[key]
    better = sum(b[key] < a[key] for a, b in itertools.pairwise(curve))
    labels = ""
    if isinstance(first.get("train labels"), int) and isinstance(last.get("train labels"), int):
        labels = (f" as its training labels grew {first['train labels']} -> "
                  f"{last['train labels']}")
    trend = "fell" if ratio < 1 else "rose"
    return (f"{what} force MAE {trend} {_cell(first[key], 1000.0)} -> "
            f"{_cell(last[key], 1000.0)} meV/Å from round {first['round']} to round "
            f"{last['round']} ({ratio:.2f} x){labels}; lower than the round before in "
            f"{better} of {len(curve) - 1} rounds.")


def print_round_metrics(campaign: str) -> None:
    """The learning-curve table of a campaign's completed rounds."""
    from bayesal.db import make_engine
    from bayesal.db.rounds import round_history
    from bayesal.flows.campaign_report import round_rows

    engine = make_engine(settings().database_url, readonly=True)
    rows = round_rows([r for r in round_history(engine, campaign)
                       if r["status"] == "completed"])
    engine.dispose()
    if rows:
        console.print(round_metrics_table(campaign, rows))
        verdict = learning_verdict(rows)
        if verdict:
            console.print(verdict, markup=False, highlight=False)


@app.command("deploy")
def deploy(
    config: Annotated[Path, typer.Argument(help="Campaign YAML the deployment runs.")],
    name: Annotated[str | None, typer.Option(help="Deployment name (default: the campaign "
                                             "name).")] = None,
    pool: Annotated[str, typer.Option(help="Prefect work pool (a process pool is created "
                                      "if missing).")] = "bayesal",
    run_now: Annotated[bool, typer.Option("--run", help="Also start a run of it.")] = False,
) -> None:
    """Register a campaign as a Prefect deployment on a work pool.

    The deployment runs flow `campaign` with parameter `config`. Needs a Prefect server
    (PREFECT_API_URL); start a worker with `prefect worker start --pool POOL`.
    The worker's runs get this shell's BAYESAL_* settings."""
    from bayesal.flows.campaign_config import load_campaign_config

    with user_errors():
        cfg = load_campaign_config(config)
        if not os.environ.get("PREFECT_API_URL"):
            raise ValueError("bayesal deploy needs a Prefect server: start one with `prefect "
                             "server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
        from bayesal.flows.deploy import deploy_campaign

        deployment_id, flow_run_id, had_password = deploy_campaign(
            config.resolve(), name or cfg.name, pool, settings(), run_now=run_now)
        console.print(f"deployment campaign/{name or cfg.name} ({deployment_id}) on work pool "
                      f"{pool}")
        if had_password:
            console.print("the database password is not stored in the deployment (the "
                          "Prefect API has no login): give the worker's environment "
                          "PGPASSWORD, or a ~/.pgpass / PGPASSFILE entry; see docs/security.md",
                          markup=False, highlight=False)
        if flow_run_id:
            console.print(f"started flow run {flow_run_id}")
        console.print(f"start a worker: prefect worker start --pool {pool}\n"
                      f"run it:         prefect deployment run campaign/{name or cfg.name}",
                      markup=False, highlight=False)
