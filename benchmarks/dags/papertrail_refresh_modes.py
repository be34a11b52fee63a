"""Benchmark DAGs: 32 tasks that each need an access token of one (expired) grant.

``bench_refresh_coordinated`` uses ``PapertrailHook.get_access_token()``; ``bench_refresh_naive``
is what a hand-written DAG typically does (load, refresh if expired, save), as the baseline.
"""

from __future__ import annotations

import time

import pendulum
from airflow.sdk import DAG, task

CONN_ID = "papertrail_bench"


@task(retries=0)
def coordinated(i: int) -> bool:
    from airflow_papertrail.hooks.papertrail import PapertrailHook

    return bool(PapertrailHook(CONN_ID).get_access_token())


@task(retries=0)
def naive(i: int) -> bool:
    from airflow_papertrail.hooks.papertrail import PapertrailHook

    hook = PapertrailHook(CONN_ID)
    stored = hook.token_store.load()
    assert stored is not None
    if stored.token.expires_within(hook.config.leeway, time.time()):
        token = hook.oauth_client.refresh(stored.token.refresh_token, previous=stored.token)
        hook.token_store.save(token, based_on=stored)
    return True


for name, fn in (("coordinated", coordinated), ("naive", naive)):
    with DAG(
        dag_id=f"bench_refresh_{name}",
        schedule=None,
        start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
        catchup=False,
        max_active_tasks=32,
    ):
        fn.expand(i=list(range(32)))
