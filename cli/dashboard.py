"""``bayesal dashboard``: the Streamlit web app over the campaign database (read-only)."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from bayesal import dashboard
from bayesal.cli._app import app, console, err_console, settings, user_errors

APP = Path(dashboard.__file__).resolve().parent / "app.py"  # wherever the package is installed


def streamlit_command(host: str, port: int, campaign: str | None,
                      refresh: float) -> list[str]:
    """The ``streamlit run`` command line of the dashboard (headless, no telemetry)."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP),
           "--server.address", host, "--server.port", str(port), "--server.headless", "true",
           "--server.fileWatcherType", "none", "--server.runOnSave", "false",
           "--browser.gatherUsageStats", "false", "--global.developmentMode", "false",
           "--client.toolbarMode", "minimal", "--", "--refresh", str(refresh)]
    if campaign is not None:
        cmd += ["--campaign", campaign]
    return cmd


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command("dashboard")
def dashboard(
    campaign: Annotated[str | None, typer.Option(
        help="Campaign to open (default: the newest; any can be picked in the sidebar).")] = None,
    host: Annotated[str, typer.Option(
        help="Address to bind; 0.0.0.0 exposes the dashboard (no authentication) to the "
             "network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 8501,
    refresh: Annotated[float, typer.Option(
        min=0, help="Seconds between automatic refreshes (0: off).")] = 30.0,
) -> None:
    """Web dashboard of campaigns: rounds, learning curves, calibration, acquisition scores,
    labeling, the labelled data (CSV download) and a 3D view of structures.

    Reads the database of BAYESAL_DATABASE_URL / --database-url through a read-only
    connection in short transactions, so it can watch a running campaign. Set PREFECT_API_URL
    to link rounds to their Prefect flow runs. Stop it with Ctrl-C.
    """
    from bayesal.db import ensure_schema, readonly_engine
    from bayesal.flows.deploy import absolute_database_url

    with user_errors():
        url = absolute_database_url(settings().database_url)
        engine = readonly_engine(url)  # fails early, with the fix, on a missing database
        try:
            ensure_schema(engine)
        finally:
            engine.dispose()
    if not _is_loopback(host):
        err_console.print(f"warning: serving on {host}: anyone who can reach this "
                          "address can read the campaign data (there is no login)")
    env = {**os.environ, "BAYESAL_DATABASE_URL": url}  # not on the command line (passwords)
    console.print(f"bayesal dashboard on http://{host}:{port}  (Ctrl-C to stop)")
    sys.stdout.flush()
    # Become the Streamlit server (same PID): signals (Ctrl-C, SIGTERM from a job scheduler
    # or a test) reach the server itself and no orphaned server is left behind.
    cmd = streamlit_command(host, port, campaign, refresh)
    os.execve(cmd[0], cmd, env)
