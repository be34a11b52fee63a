"""One query per client organisation, mapped over connection ids (benchmarks/scaleout_many.py).

``conf.conn_ids``: the ``papertrail`` connections; one ``company/co_details`` query each with the
provider's own operator, so each task needs a valid token (all expired: one refresh each).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, get_current_context, task

from airflow_papertrail.operators.query import PapertrailQueryOperator


@task
def conn_ids() -> list[str]:
    return list(get_current_context()["dag_run"].conf["conn_ids"])


@dag(
    dag_id="papertrail_bench_many",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_tasks=256,
    default_args={"retries": 0},
)
def papertrail_bench_many():
    PapertrailQueryOperator.partial(task_id="query", module="company", query="co_details").expand(
        papertrail_conn_id=conn_ids()
    )


papertrail_bench_many()
