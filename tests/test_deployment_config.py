"""docker-compose.yml cannot run here (no Docker engine); check what can be checked."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]


def _default(value: str) -> str:
    """Resolve compose's ``${VAR:-default}`` to its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_compose_postgres_matches_documented_database_url():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    pg = compose["services"]["postgres"]
    env = {k: _default(v) for k, v in pg["environment"].items()}
    host, port = re.match(r"(.+):(\d+):5432", _default(pg["ports"][0])).groups()
    assert host == "127.0.0.1"  # never exposed beyond loopback by default
    readme = (REPO / "README.md").read_text()
    documented = re.search(r"(postgresql\+psycopg://\S+@127\.0\.0\.1:\d+/\w+)", readme).group(1)
    url = make_url(documented)
    assert (url.username, url.password, url.database, url.port) == (
        env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"], int(port))
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_worker_reaches_the_campaign_database_and_the_prefect_server():
    services = _compose()["services"]
    assert {"postgres", "prefect-db", "prefect-server", "worker"} <= set(services)
    pg = {k: _default(v) for k, v in services["postgres"]["environment"].items()}
    env = {k: _default(str(v)) for k, v in services["worker"]["environment"].items()}
    url = make_url(env["BAYESAL_DATABASE_URL"])
    assert (url.host, url.port) == ("postgres", 5432)  # the service, inside the network
    assert (url.username, url.password, url.database) == (
        pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
    # the worker's settings are valid bayesal settings
    from bayesal.flows.settings import Settings

    Settings(database_url=env["BAYESAL_DATABASE_URL"], data_dir=env["BAYESAL_DATA_DIR"])
    api = make_url(env["PREFECT_API_URL"].replace("http://", "postgresql://"))
    server = services["prefect-server"]
    assert api.host == "prefect-server" and str(api.port) in " ".join(server["command"])
    assert "prefect worker start --pool bayesal" in " ".join(services["worker"]["command"])
    assert "bayesal db upgrade" in " ".join(services["worker"]["command"])


def test_compose_dashboard_reads_the_campaign_database_of_the_worker():
    services = _compose()["services"]
    dash, worker = services["dashboard"], services["worker"]
    assert dash["image"] == worker["image"]
    env = {k: _default(str(v)) for k, v in dash["environment"].items()}
    worker_env = {k: _default(str(v)) for k, v in worker["environment"].items()}
    assert env["BAYESAL_DATABASE_URL"] == worker_env["BAYESAL_DATABASE_URL"]
    command = dash["command"]
    assert command[:2] == ["bayesal", "dashboard"]
    port = command[command.index("--port") + 1]
    assert command[command.index("--host") + 1] == "0.0.0.0"  # inside the container
    assert _default(dash["ports"][0]) == f"127.0.0.1:8501:{port}"  # loopback on the host
    assert env["PREFECT_UI_URL"].startswith("http://127.0.0.1:")
    # the command line parses: the options exist on `bayesal dashboard`
    from typer.testing import CliRunner

    from bayesal.cli import app

    help_text = CliRunner().invoke(app, ["dashboard", "--help"]).output
    assert "--host" in help_text and "--port" in help_text


def test_compose_prefect_server_has_its_own_database():
    services = _compose()["services"]
    prefect_url = make_url(_default(services["prefect-server"]["environment"][
        "PREFECT_API_DATABASE_CONNECTION_URL"]))
    assert prefect_url.host == "prefect-db" and prefect_url.drivername == "postgresql+asyncpg"
    db = {k: _default(v) for k, v in services["prefect-db"]["environment"].items()}
    assert (prefect_url.username, prefect_url.database) == (db["POSTGRES_USER"],
                                                            db["POSTGRES_DB"])
    assert db["POSTGRES_DB"] != _default(services["postgres"]["environment"]["POSTGRES_DB"])


def test_compose_publishes_ports_on_loopback_only():
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert _default(port).startswith("127.0.0.1:"), name


def test_dockerfile_installs_cpu_torch_first_and_every_package():
    text = (REPO / "Dockerfile").read_text()
    assert text.index("torch==2.13.0") < text.index("pip install -e .")
    import tomllib

    folders = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"].values()
    assert set(folders) >= {"bayesal", "flows", "tasks", "bayes_model", "labelers", "db"}
    for folder in folders:
        assert f"COPY {folder} {folder}" in text


def test_prefect_yaml_deployment_points_at_the_campaign_flow():
    import importlib

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    path, func = dep["entrypoint"].split(":")
    module = importlib.import_module("bayesal." + path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, func)
    assert flow.name == "campaign"
    assert set(dep["parameters"]) <= set(flow.parameters.properties)
    assert (REPO / dep["parameters"]["config"]).is_file()
    assert dep["work_pool"]["name"] == "bayesal"
