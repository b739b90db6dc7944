"""Dependencies point one way: flows -> tasks -> (bayes_model | labelers | db); the dashboard
reads through db/ only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("bayes_model", "labelers", "db")


def imported_roots(package: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in (REPO / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        roots = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
        out[str(path.relative_to(REPO))] = roots
    return out


@pytest.mark.parametrize("package", LIBRARIES)
def test_libraries_never_import_prefect_or_each_other(package):
    forbidden = {"prefect", "flows", "tasks"} | (set(LIBRARIES) - {package})
    offenders = {f: sorted(r & forbidden) for f, r in imported_roots(package).items()
                 if r & forbidden}
    assert offenders == {}


def test_tasks_do_not_import_flows():
    offenders = {f: r for f, r in imported_roots("tasks").items() if "flows" in r}
    assert offenders == {}


def test_dashboard_reads_through_db_only():
    """The dashboard is a read-only view: db/ and plotting, no Prefect, flows, tasks, models
    or labelers."""
    forbidden = {"prefect", "flows", "tasks", "bayes_model", "labelers"}
    roots = imported_roots("dashboard")
    assert set(roots) >= {"dashboard/app.py", "dashboard/data.py"}
    offenders = {f: sorted(r & forbidden) for f, r in roots.items() if r & forbidden}
    assert offenders == {}
    assert all("db" in r for f, r in roots.items() if f.endswith(("app.py", "data.py")))
