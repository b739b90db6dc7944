"""Docs that are generated from code stay in step with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REGENERATE = "typer bayesal.cli utils docs --name bayesal --output docs/cli.md"


def test_cli_reference_is_current(tmp_path):
    out = tmp_path / "cli.md"
    typer = Path(sys.executable).with_name("typer")
    subprocess.run([str(typer), "bayesal.cli", "utils", "docs", "--name", "bayesal",
                    "--output", str(out)], check=True, capture_output=True, cwd=REPO)
    committed = (REPO / "docs" / "cli.md").read_text()
    assert out.read_text() == committed, f"docs/cli.md is stale; regenerate with: {REGENERATE}"


def test_every_command_has_help_text():
    from typer.main import get_command

    from bayesal.cli import app

    root = get_command(app)

    def walk(cmd, path):
        assert (cmd.help or "").strip(), f"`{' '.join(path)}` has no help text"
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(root, ["bayesal"])
