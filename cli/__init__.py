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
from bayesal.cli._app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
