"""32 mapped tasks that all need a token of one grant at the same time (E2E refresh proof)."""

from __future__ import annotations

import os
import signal
import threading
from datetime import timedelta

import pendulum
import requests
from airflow.sdk import dag, get_current_context, task


@task(retries=2, retry_delay=timedelta(seconds=1))
def use_token(i: int) -> int:
    from airflow_papertrail.hooks.papertrail import PapertrailHook

    ctx = get_current_context()
    ti = ctx["ti"]
    if (ctx["dag_run"].conf or {}).get("kill_one") and ti.map_index == 0 and ti.try_number == 1:
        # Die while this task's refresh request is in flight (the token endpoint is slowed down).
        threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    hook = PapertrailHook("papertrail_e2e")
    token = hook.get_access_token()
    api = hook.config.effective_api_url
    response = requests.get(
        f"{api}/api_company.php",
        params={"system": "xero", "query": "co_details"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        verify=hook.config.verify,
    )
    response.raise_for_status()
    return hook.get_stored_grant().generation


@dag(
    dag_id="papertrail_refresh_e2e",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_tasks=32,
)
def papertrail_refresh_e2e():
    use_token.expand(i=list(range(32)))


papertrail_refresh_e2e()
