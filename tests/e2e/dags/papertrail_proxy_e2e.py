"""8 mapped tasks that need a token while the refresh coordinator sits behind a proxy that times out."""

from __future__ import annotations

from datetime import timedelta

import pendulum
import requests
from airflow.sdk import dag, task


@task(retries=6, retry_delay=timedelta(seconds=1))
def use_token(i: int) -> int:
    from airflow_papertrail.hooks.papertrail import PapertrailHook

    hook = PapertrailHook("papertrail_lb")
    token = hook.get_access_token()
    response = requests.get(
        f"{hook.config.effective_api_url}/api_company.php",
        params={"system": "xero", "query": "co_details"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    response.raise_for_status()
    return hook.get_stored_grant().generation


@dag(
    dag_id="papertrail_proxy_e2e",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_tasks=8,
)
def papertrail_proxy_e2e():
    use_token.expand(i=list(range(8)))


papertrail_proxy_e2e()
