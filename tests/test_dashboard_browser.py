"""`bayesal dashboard` served on a free loopback port over the 3-round demo campaign
(tests/dashboard_fixture.py), opened in Debian's headless Chromium through Playwright: the
round table and the learning curve show the fixture's numbers, every view renders without an
exception, an unknown campaign gets a message listing the existing ones and a campaign
without rounds an empty state. Screenshots go to artifacts/dashboard-*.png (or
$BAYESAL_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dashboard_fixture as fx
import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("BAYESAL_TEST_ARTIFACTS", REPO / "artifacts"))
CHROMIUM = shutil.which("chromium")  # on PATH: a test hides it to check the skip
PREFECT_API = "http://127.0.0.1:4200/api"
TABS = ("Overview", "Learning curves", "Calibration", "Acquisition", "Labeling", "Data",
        "Structure")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def database(tmp_path_factory) -> str:
    from bayesal.db import make_engine

    url = f"sqlite:///{tmp_path_factory.mktemp('dash') / 'demo.db'}"
    engine = make_engine(url)
    fx.build_demo(engine)
    engine.dispose()
    return url


def _launch(database: str, args: tuple[str, ...], log: Path) -> tuple[subprocess.Popen, str]:
    """Start `bayesal dashboard ARGS` on ``database``; the process and its URL once healthy."""
    port = _free_port()
    env = {**os.environ, "BAYESAL_DATABASE_URL": database, "PREFECT_API_URL": PREFECT_API}
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("bayesal")), "dashboard", "--port", str(port),
         "--refresh", "0", *args],
        env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"dashboard exited: {log.read_text()}"
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"dashboard did not come up: {log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    port = int(proc.args[proc.args.index("--port") + 1])
    proc.terminate()  # `bayesal dashboard` is the server (exec): nothing is left behind
    proc.wait(timeout=30)
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))


@pytest.fixture(scope="module")
def serve(database, tmp_path_factory):
    """Start `bayesal dashboard ARGS` and return its URL; stopped at the end."""
    procs = []

    def start(*args: str) -> str:
        proc, url = _launch(database, args, tmp_path_factory.mktemp("log") / "dashboard.log")
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        _stop(proc)


@pytest.fixture(scope="module", autouse=True)
def chromium_present():
    """Skip (first, before any server starts) where Chromium is not installed, unless
    BAYESAL_REQUIRE_CHROMIUM=1 (set by .ci/run), which makes that a failure."""
    if CHROMIUM is None:
        why = ("Chromium not found on PATH: install it with `apt-get install chromium` "
               "(Debian's package; .ci/run does)")
        if os.environ.get("BAYESAL_REQUIRE_CHROMIUM") == "1":
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.get_by_role("tab", name="Overview").wait_for(timeout=60_000)
    return page


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def _no_exception(page) -> None:
    errors = page.locator('[data-testid="stException"]')
    assert errors.count() == 0, errors.first.inner_text()
    assert "Traceback" not in page.inner_text("body")


def test_round_table_learning_curve_and_every_view(serve, browser):
    page = _open(browser, serve("--campaign", "demo"))
    table = page.locator("table").first
    table.wait_for(timeout=60_000)
    header = [c.strip() for c in table.locator("thead th").all_inner_texts()]
    rows = [[c.strip() for c in row.locator("td, th").all_inner_texts()]
            for row in table.locator("tbody tr").all()]
    assert len(rows) == 3
    col = {name: i for i, name in enumerate(header)}
    assert [r[col["round"]] for r in rows] == ["0", "1", "2"]
    assert [r[col["training labels"]] for r in rows] == [str(n) for n in fx.TRAIN_LABELS]
    assert [float(r[col["test F MAE (meV/Å)"]]) for r in rows] == [
        pytest.approx(1000 * v) for v in fx.FORCE_MAE]
    assert [r[col["failed labels"]] for r in rows] == ["0", "1", "0"]
    body = page.inner_text("body")
    assert "Campaign demo" in body and "6 of 10" in body  # label budget used
    link = page.locator('a[href$="/runs/flow-run/00000000-0000-0000-0000-000000000002"]')
    assert link.count() == 1
    assert link.get_attribute("href").startswith("http://127.0.0.1:4200/runs/")
    _no_exception(page)
    shots = [_shot(page, "overview")]

    page.get_by_role("tab", name="Learning curves").click()
    page.wait_for_function("""() => Array.from(document.querySelectorAll('.js-plotly-plot'))
        .some(d => d.offsetParent !== null && (d.data || []).some(t => t.name === 'water_a'))""",
                           timeout=30_000)
    traces = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot'))
        .filter(d => d.offsetParent !== null)
        .flatMap(d => (d.data || []).map(t => ({name: t.name, x: Array.from(t.x),
                                                y: Array.from(t.y)})))""")
    curve = {t["name"]: t for t in traces}
    assert curve["all"]["x"] == fx.TRAIN_LABELS
    assert curve["all"]["y"] == [pytest.approx(1000 * v) for v in fx.FORCE_MAE]
    assert curve["water_a"]["y"] == [pytest.approx(1000 * v) for v in fx.FORCE_MAE_A]
    visible = page.locator(".js-plotly-plot .scatterlayer .trace").filter(visible=True)
    assert visible.count() >= 2  # the SVG lines were drawn, not only the data attached
    _no_exception(page)
    shots.append(_shot(page, "learning-curves"))

    for tab in TABS[2:]:
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(1500)
        if tab == "Data":  # unfiltered: every label of the campaign, counted by the database
            page.get_by_text("of 13 matching").wait_for(timeout=30_000)
        _no_exception(page)
        shots.append(_shot(page, tab.lower().replace(" ", "-")))
    body = page.inner_text("body")
    assert "H2O" in body and "Predicted uncertainty" in body  # structure view
    print("screenshots:", *shots, sep="\n  ")


def test_unknown_campaign_and_empty_state(serve, browser):
    page = _open(browser, serve("--campaign", "nope"))
    message = page.get_by_text("No campaign named 'nope'")
    message.wait_for(timeout=60_000)
    assert "Existing campaigns: demo, fresh" in message.inner_text()
    # the newest campaign is shown instead: it has no round yet
    page.get_by_text("No rounds yet").wait_for(timeout=30_000)
    page.get_by_role("tab", name="Learning curves").click()
    page.get_by_text("No evaluated round yet").first.wait_for(timeout=30_000)
    _no_exception(page)
    _shot(page, "unknown-campaign")


@pytest.mark.postgres
def test_the_page_never_shows_the_database_password(pg_url, browser, tmp_path):
    """The sidebar names the database; the password, in either URL form, stays hidden."""
    from sqlalchemy.engine import make_url

    from bayesal.db import make_engine

    secret = "s3cretPW"
    parsed = make_url(pg_url)  # the test server trusts local connections
    url = parsed.set(password=secret, query={"password": secret}).render_as_string(
        hide_password=False)
    engine = make_engine(url)
    fx.build_demo(engine)
    engine.dispose()
    proc, page_url = _launch(url, ("--campaign", "demo"), tmp_path / "dashboard.log")
    try:
        page = _open(browser, page_url)
        page.get_by_text("Campaign demo").wait_for(timeout=60_000)
        sidebar = page.locator('[data-testid="stSidebar"]').inner_text()
        assert "***" in sidebar and parsed.host in sidebar
        assert secret not in page.content() and secret not in page.inner_text("body")
        _no_exception(page)
    finally:
        _stop(proc)
    assert secret not in (tmp_path / "dashboard.log").read_text()


def test_a_big_campaign_opens_with_bounded_views(browser, tmp_path_factory):
    """200,000 labels and 1,000,000 scores (tests/dashboard_fixture.build_big): every view
    renders, the plots say they show a sample, the Data tab pages through the count."""
    from bayesal.db import make_engine, upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('bigdash') / 'big.db'}"
    engine = make_engine(url)
    upgrade(engine)
    fx.build_big(engine, 200_000, 5, 200_000)
    engine.dispose()
    proc, page_url = _launch(url, ("--campaign", "big"),
                             tmp_path_factory.mktemp("log") / "dashboard.log")
    try:
        page = _open(browser, page_url)
        page.get_by_text("Campaign big").wait_for(timeout=90_000)
        # the metrics render after the heading: wait for the ok labels, counted in SQL
        page.wait_for_function("""() => document.body.innerText.replaceAll(',', '')
                                       .includes('196000')""", timeout=90_000)
        _no_exception(page)
        page.get_by_role("tab", name="Acquisition").click()
        page.get_by_text("The histogram shows").wait_for(timeout=60_000)
        caption = page.get_by_text("The histogram shows").inner_text()
        assert "of the round's 200,000 candidates" in caption
        page.get_by_role("tab", name="Labeling").click()
        page.get_by_text("the newest 500 of 4,000").wait_for(timeout=60_000)
        page.get_by_role("tab", name="Data").click()
        page.get_by_text("labels 1-500 of 200,000 matching").wait_for(timeout=60_000)
        for tab in TABS:
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(500)
            _no_exception(page)
        _shot(page, "big-campaign")
    finally:
        _stop(proc)
