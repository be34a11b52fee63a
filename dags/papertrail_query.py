"""Run one Papertrail-ai query and use its answer in the next task.

``PapertrailQueryOperator`` returns the service's JSON answer through XCom: right for a
report, one invoice or company details, and for writes. For long lists use
``PapertrailExtractOperator`` (see ``papertrail_extract``), which streams to storage.
Authorize the connection once with the ``papertrail_authorize`` DAG first.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from airflow_papertrail.operators.papertrail import PapertrailQueryOperator


@dag(
    dag_id="papertrail_query",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    tags=["papertrail"],
    params={"conn_id": Param("papertrail_default", type="string", description="Papertrail-ai connection")},
    doc_md=__doc__,
)
def papertrail_query():
    trial_balance = PapertrailQueryOperator(
        task_id="trial_balance",
        papertrail_conn_id="{{ params.conn_id }}",
        module="reports",
        query="trial_balance",
    )

    @task
    def summarize(answer) -> dict:
        # The service's answer shapes are not published: look, don't assume.
        report = answer.get("data", answer) if isinstance(answer, dict) else answer
        fields = sorted(report) if isinstance(report, dict) else []
        print(f"trial_balance answered a {type(report).__name__} with fields {fields}")
        return {"type": type(report).__name__, "fields": fields}

    summarize(trial_balance.output)


papertrail_query()
