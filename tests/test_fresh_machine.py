"""README's test command on a machine without the system packages CI installs: the tests
that need Chromium or a PostgreSQL server skip with the install command as the reason (CI
sets BAYESAL_REQUIRE_CHROMIUM / BAYESAL_REQUIRE_POSTGRES, which turn such a skip into a
failure). The binaries are hidden from a pytest run in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pytest(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    bare = {k: v for k, v in os.environ.items()
            if not k.startswith(("BAYESAL_REQUIRE", "BAYESAL_TEST_POSTGRES"))}
    bare.update(PATH=str(Path(sys.executable).parent), BAYESAL_TEST_PG_GLOB=str(tmp_path / "*"),
                **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "t"), *args], cwd=REPO, env=bare,
                          capture_output=True, text=True, timeout=300)


def test_without_chromium_the_browser_tests_skip_and_ci_makes_that_a_failure(tmp_path):
    out = _pytest(["tests/test_dashboard_browser.py", "-m", "not postgres"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "3 skipped" in out.stdout and "apt-get install chromium" in out.stdout, out.stdout
    out = _pytest(["tests/test_dashboard_browser.py", "-m", "not postgres"], tmp_path,
                  BAYESAL_REQUIRE_CHROMIUM="1")
    assert out.returncode == 1 and "Chromium not found" in out.stdout, out.stdout[-3000:]


def test_without_postgresql_its_tests_skip_and_ci_makes_that_a_failure(tmp_path):
    test = "tests/test_migrations.py::test_sqlite_and_postgres_schemas_are_identical"
    out = _pytest([test], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "1 skipped" in out.stdout and "apt-get install postgresql" in out.stdout, out.stdout
    out = _pytest([test], tmp_path, BAYESAL_REQUIRE_POSTGRES="1")
    assert out.returncode == 1 and "PostgreSQL required" in out.stdout, out.stdout[-3000:]
