"""Dependencies point one way: flows -> tasks -> (bayes_model | labelers | db); the dashboard
reads through db/ only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import TINY

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("bayes_model", "labelers", "db")


def _root(module: str) -> str:
    """The top-level name of an import, our packages named by their folder
    (``bayesal.db.models`` -> ``db``)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "bayesal" and len(parts) > 1 else parts[0]


def imported_roots(package: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in (REPO / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        roots = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots.update(_root(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "bayesal":  # from bayesal import db
                    roots.update(a.name for a in node.names)
                else:
                    roots.add(_root(node.module))
        out[str(path.relative_to(REPO))] = roots
    return out


def test_our_packages_are_imported_as_bayesal_only():
    """No module imports one of our packages by its folder name (``import db``): installed,
    there is only ``bayesal``."""
    ours = {"cli", "flows", "tasks", "bayes_model", "labelers", "db", "dashboard"}
    offenders = {}
    for path in [*REPO.glob("*/*.py"), *REPO.glob("*/*/*.py"), *REPO.glob("*/*/*/*.py")]:
        if ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                     and node.module else [])
            bad = [n for n in names if n.split(".")[0] in ours]
            if bad:
                offenders.setdefault(str(path.relative_to(REPO)), []).extend(bad)
    assert offenders == {}


@pytest.mark.parametrize("package", LIBRARIES)
def test_libraries_never_import_prefect_or_each_other(package):
    forbidden = {"prefect", "cli", "flows", "tasks"} | (set(LIBRARIES) - {package})
    offenders = {f: sorted(r & forbidden) for f, r in imported_roots(package).items()
                 if r & forbidden}
    assert offenders == {}


def test_contracts_depend_on_nothing_of_ours():
    """bayesal.contracts is the one module all libraries share: it must import none of
    them (nor Prefect, torch or SQLAlchemy)."""
    roots = imported_roots("bayesal")["bayesal/contracts.py"]
    assert roots <= {"__future__", "collections", "ctypes", "enum", "hashlib", "json", "os",
                     "re", "signal", "sys", "typing", "numpy", "scipy", "ase"}, roots


def test_tasks_do_not_import_flows_and_flows_not_the_cli():
    offenders = {f: r for f, r in imported_roots("tasks").items() if r & {"flows", "cli"}}
    offenders |= {f: r for f, r in imported_roots("flows").items() if "cli" in r}
    assert offenders == {}


def test_dashboard_reads_through_db_only():
    """The dashboard is a read-only view: db/ and plotting, no Prefect, flows, tasks, models
    or labelers."""
    forbidden = {"prefect", "cli", "flows", "tasks", "bayes_model", "labelers"}
    roots = imported_roots("dashboard")
    assert set(roots) >= {"dashboard/app.py", "dashboard/data.py"}
    offenders = {f: sorted(r & forbidden) for f, r in roots.items() if r & forbidden}
    assert offenders == {}
    assert all("db" in r for f, r in roots.items() if f.endswith(("app.py", "data.py")))


WHEEL_CHECK = """
import sys
import bayesal, bayesal.bayes_model.model, bayesal.dashboard.data, bayesal.db, bayesal.cli
import bayesal.labelers, bayesal.tasks.steps
from bayesal.db import make_engine, upgrade
assert bayesal.db.__file__.startswith(sys.argv[1]), bayesal.db.__file__
import os, ase.io
from bayesal.datasets import reference_dir
os.environ.pop("BAYESAL_SHARED_DATA", None)
data = reference_dir(sys.argv[3])  # the packaged reference data, decompressed
assert len(ase.io.read(data / "acac" / "train_600K.xyz", ":")) == 500
print(upgrade(make_engine("sqlite:///" + sys.argv[2])))
"""


@pytest.mark.slow
def test_the_wheel_installs_only_bayesal_and_runs_from_it(tmp_path):
    """A wheel built from the repository holds one top-level package, ``bayesal`` (plus its
    metadata), and works installed on its own: its subpackages import from it and its
    database migrations (data files) are there."""
    import shutil
    import subprocess
    import sys
    import tomllib
    import zipfile

    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ there
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for folder in {*pyproject["tool"]["setuptools"]["package-dir"].values()}:
        shutil.copytree(REPO / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(src)], check=True,
                   capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("bayesal-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"bayesal"}
    data = sorted(n for n in names if n.startswith("bayesal/data/"))
    assert "bayesal/data/reference/LICENSE" in data and len(data) == 2 + 7  # + README
    assert not any("tests/" in n or "benchmarks/" in n for n in names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=600)
    proc = subprocess.run([sys.executable, "-c", WHEEL_CHECK, str(site), str(tmp_path / "x.db"),
                           str(tmp_path / "cache")],
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] != ""

    # the quickstart config, shrunk to one quick round, run by the installed package from
    # another folder: its files resolve against the config's folder
    import yaml

    project, cwd = tmp_path / "project", tmp_path / "elsewhere"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-c", "import sys; from bayesal.datasets import "
                           "write_quickstart_data as w; w(sys.argv[1], n_pool=12, n_test=3)",
                           str(project / "quickstart-data")],
                          env={"PYTHONPATH": str(site), "XDG_CACHE_HOME": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    cfg["data"]["initial_random"] = 4
    cfg.update(model=TINY, train={"max_epochs": 2, "batch_size": 2},
               finetune=None, stop={"max_rounds": 1})
    cfg["acquisition"]["n_select"] = 2
    (project / "quickstart.yaml").write_text(yaml.safe_dump(cfg))
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "BAYESAL_DATABASE_URL": f"sqlite:///{tmp_path / 'q.db'}"}
    cli = "import sys; sys.argv[0] = 'bayesal'; from bayesal.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", cli, "run", "../project/quickstart.yaml"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=cwd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "stopped after 1 round(s)" in proc.stdout
    assert (cwd / "bayesal-data" / "campaigns" / "quickstart" / "round-000").is_dir()


def test_tests_share_helpers_not_conftest():
    """Helpers come from tests/helpers.py; conftest.py holds fixtures only (importing it
    as a module runs it twice under two names)."""
    offenders = [p.name for p in (REPO / "tests").glob("*.py") if p != Path(__file__)
                 and any(s in p.read_text() for s in ("from conftest import", "import conftest"))]
    assert offenders == []


QUERY_BUILDERS = {"select", "insert", "update", "delete", "text", "func", "and_", "or_",
                  "exists", "Session", "sessionmaker"}


@pytest.mark.parametrize("package", ["cli", "flows", "tasks", "bayes_model", "labelers",
                                     "dashboard"])
def test_sql_lives_in_db(package):
    """Queries are built in db/ only: elsewhere SQLAlchemy appears for its Engine type, its
    errors and URL parsing, never to build a statement or a session."""
    offenders = {}
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
                names = {a.name for a in node.names}
                if node.module.startswith("sqlalchemy.orm") or names & QUERY_BUILDERS:
                    offenders[str(path.relative_to(REPO))] = sorted(names)
            elif isinstance(node, ast.Import) and any(a.name.startswith("sqlalchemy")
                                                      for a in node.names):
                offenders[str(path.relative_to(REPO))] = ["sqlalchemy"]
    assert offenders == {}
