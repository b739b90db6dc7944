"""Prefect deployments of campaigns: `bayesal deploy` (the same as `prefect deploy` with
prefect.yaml, but with this shell's BAYESAL_* settings passed to the worker)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from uuid import UUID

from bayesal.flows.settings import Settings

__all__ = ["REPO", "absolute_database_url", "deploy_campaign", "ensure_work_pool"]

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/campaign.py:campaign"


def absolute_database_url(url: str) -> str:
    """A SQLite URL with an absolute file path (workers run in other directories)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        parsed = parsed.set(database=str(Path(parsed.database).resolve()))
        return parsed.render_as_string(hide_password=False)
    return url


def ensure_work_pool(name: str, kind: str = "process") -> None:
    """Create the work pool if it does not exist."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=name, type=kind))


def deploy_campaign(config: Path, name: str, pool: str, settings: Settings, *,
                    run_now: bool = False) -> tuple[UUID, UUID | None, bool]:
    """Register ``campaign(config)`` as deployment ``campaign/<name>`` on ``pool``; the
    worker's flow runs get this process's database URL (without its password: anyone who
    reaches the Prefect API can read a deployment) and data folder. Returns the deployment
    id, the flow run id (``run_now``) and whether a password was left out."""
    from bayesal.db.engine import without_secrets
    from bayesal.flows.campaign import campaign

    ensure_work_pool(pool)
    url, had_password = without_secrets(absolute_database_url(settings.database_url))
    env = {"BAYESAL_DATABASE_URL": url,
           "BAYESAL_DATA_DIR": str(Path(settings.data_dir).resolve()),
           "BAYESAL_LOG_LEVEL": settings.log_level,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    flow = campaign.from_source(source=str(REPO), entrypoint=ENTRYPOINT)
    deployment_id = flow.deploy(name=name, work_pool_name=pool,
                                parameters={"config": str(Path(config).resolve())},
                                job_variables={"env": env, "working_dir": str(REPO)},
                                build=False, push=False, print_next_steps=False)
    run_id = None
    if run_now:
        from prefect.deployments import run_deployment

        run_id = run_deployment(f"campaign/{name}", timeout=0).id
    return deployment_id, run_id, had_password
