"""Docs that are generated from code stay in step with it."""

from __future__ import annotations

import itertools
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


def test_every_model_setting_is_documented_with_its_default():
    """`bayesal train --print-config` loads back to the defaults, names every field of the
    model/train/posterior settings, and docs/model.md embeds exactly what it prints."""
    import yaml
    from pydantic import BaseModel
    from typer.testing import CliRunner

    from bayesal.bayes_model.config import TrainingFile, default_yaml
    from bayesal.cli import app

    res = CliRunner().invoke(app, ["train", "--print-config"])
    assert res.exit_code == 0, res.output
    loaded = yaml.safe_load(res.output)
    assert TrainingFile.model_validate(loaded) == TrainingFile()

    def fields(cls: type[BaseModel], data: dict, path: str) -> None:
        for name, info in cls.model_fields.items():
            assert name in data, f"{path}{name} missing from --print-config"
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                fields(info.annotation, data[name], f"{path}{name}.")

    fields(TrainingFile, loaded, "")
    doc = (REPO / "docs" / "model.md").read_text()
    embedded = doc.split("<!-- print-config: begin -->\n```yaml\n")[1].split("```")[0]
    assert embedded == default_yaml(), "docs/model.md's settings list is stale: paste " \
        "`bayesal train --print-config` (without its first line) between the markers"


def test_help_texts_keep_their_paragraphs_whole_at_80_columns():
    """`bayesal CMD --help` wraps each docstring paragraph to the terminal: a line of
    description is only broken where the next word would not fit (no line breaks left
    over from the source: "tables:" / "campaigns, ...")."""
    from typer.main import get_command
    from typer.testing import CliRunner

    from bayesal.cli import app

    width = 80
    paths = []

    def walk(cmd, path):
        paths.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(get_command(app), [])
    for path in paths:
        res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(width)},
                                 terminal_width=width)
        assert res.exit_code == 0, res.output
        lines = res.output.splitlines()
        start = next(i for i, line in enumerate(lines) if "Usage:" in line) + 1
        end = next(i for i, line in enumerate(lines) if line.lstrip().startswith("╭"))
        text = [line.strip() for line in lines[start:end]]
        for a, b in itertools.pairwise(text):
            if not a or not b or b.startswith(("* ", "- ")):
                continue
            assert len(a) + 1 + len(b.split()[0]) > width - 4, (
                f"`bayesal {' '.join(path)} --help` breaks a paragraph early:\n{a}\n{b}")
