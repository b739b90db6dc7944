"""Dependencies point one way: flows -> tasks -> (bayes_model | labelers | db)."""

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
