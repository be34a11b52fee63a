"""4 connections x 16 mapped tasks, each needing a valid token at once (scale-out refresh proof).

Every task reports where it ran (hostname), the grant generation it ended with, and what it saw
in its /tmp: it leaves a marker file there and lists the markers of this run, so the test can
show that tasks on one worker never see another worker's /tmp.

``conf`` (all optional): ``coordinator`` overrides ``[papertrail] refresh_coordinator`` inside
the task (``local``: the per-machine flock fallback), for the negative control;
``conn_ids`` and ``tasks_per_connection`` size the run (default: all 4 x 16), for the fault tests.
"""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import pendulum
import requests
from airflow.sdk import dag, get_current_context, task

CONNECTIONS = [f"papertrail_scaleout_{n}" for n in range(4)]
TASKS_PER_CONNECTION = 16


@task(retries=3, retry_delay=timedelta(seconds=2))
def use_token(conn_id: str, i: int) -> dict:
    ctx = get_current_context()
    conf = ctx["dag_run"].conf or {}
    if conf.get("coordinator"):
        os.environ["AIRFLOW__PAPERTRAIL__REFRESH_COORDINATOR"] = str(conf["coordinator"])
    from airflow_papertrail.hooks.papertrail import PapertrailHook

    run_tag = "".join(c if c.isalnum() else "_" for c in ctx["dag_run"].run_id)
    tmp = Path(tempfile.gettempdir())
    host = socket.gethostname()
    (tmp / f"scaleout-{run_tag}-{conn_id}-{i}").write_text(host)
    hook = PapertrailHook(conn_id)
    token = hook.get_access_token()
    response = requests.get(
        f"{hook.config.effective_api_url}/api_company.php",
        params={"system": "xero", "query": "co_details"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        verify=hook.config.verify,
    )
    response.raise_for_status()
    grant = hook.get_stored_grant()
    seen = sorted(p.name for p in tmp.glob(f"scaleout-{run_tag}-*"))
    return {
        "conn_id": conn_id,
        "i": i,
        "hostname": host,
        "tmp": str(tmp),
        "generation": grant.generation if grant else None,
        "tmp_markers": {name: (tmp / name).read_text() for name in seen},
    }


@task
def plan() -> list[dict]:
    conf = get_current_context()["dag_run"].conf or {}
    conn_ids = conf.get("conn_ids") or CONNECTIONS
    per_connection = int(conf.get("tasks_per_connection") or TASKS_PER_CONNECTION)
    return [{"conn_id": conn_id, "i": i} for conn_id in conn_ids for i in range(per_connection)]


@dag(
    dag_id="papertrail_scaleout",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_tasks=len(CONNECTIONS) * TASKS_PER_CONNECTION,
)
def papertrail_scaleout():
    use_token.expand_kwargs(plan())


papertrail_scaleout()
