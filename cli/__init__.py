"""The ``bayesal`` command line (typer). Composition root: settings -> db/labelers/models.

Run ``bayesal --help`` or ``bayesal COMMAND --help``; docs/cli.md has the reference.
"""

from bayesal.cli import (  # noqa: F401 (commands)
    campaign,
    dashboard,
    data,
    doctor,
    label,
    model,
    score,
)
from bayesal.cli._app import app, reflow_help

__all__ = ["app", "main"]

reflow_help(app)


def main() -> None:
    """Console-script entry point."""
    app()
