"""Integration DAG: PapertrailQueryOperator read and write through a real Airflow run.

Run by tests/integration/test_data_operators.py with run_dag.py (``dag.test()``).
Prints a summary without any token.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from airflow_papertrail.operators.query import PapertrailQueryOperator


@dag(
    dag_id="papertrail_data_it",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    params={"conn_id": Param("papertrail_it_data", type="string"), "customer": Param("Acme", type="string")},
)
def papertrail_data_it() -> None:
    company = PapertrailQueryOperator(
        task_id="company", module="company", query="co_details", papertrail_conn_id="{{ params.conn_id }}"
    )
    created = PapertrailQueryOperator(
        task_id="create_customer",
        module="customers",
        query="create_customer",
        payload={"name": "{{ params.customer }}", "currency": "GBP"},
        papertrail_conn_id="{{ params.conn_id }}",
    )

    @task
    def report(company_answer: dict, created_answer: dict) -> None:
        print(f"COMPANY={company_answer['data']['name']} CREATED={created_answer['data']['id']}")

    company >> created
    report(company.output, created.output)


papertrail_data_it()
