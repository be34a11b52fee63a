"""Benchmark DAG: 32 mapped tasks, each needing an access token of the connection it is given.

``conf = {"conn_ids": [...]}``: one entry per task (the same id 32 times for one grant, or
4 tasks on each of 8 grants). Used by ``benchmarks/refresh_storm.py``.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, get_current_context, task


@task
def conn_ids() -> list[str]:
    return list(get_current_context()["dag_run"].conf["conn_ids"])


@task(retries=0)
def use_token(conn_id: str) -> bool:
    from airflow_papertrail.hooks.papertrail import PapertrailHook

    return bool(PapertrailHook(conn_id).get_access_token())


@dag(
    dag_id="bench_refresh_storm",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_tasks=32,
)
def bench_refresh_storm():
    use_token.expand(conn_id=conn_ids())


bench_refresh_storm()
