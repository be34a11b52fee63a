"""Integration DAG (issue 13): exact amounts through XCom, JSON-text templates, and a write
whose 2xx answer is unreadable failing without an Airflow retry.

Run by tests/integration/test_exact_data.py with run_dag.py (``dag.test()``); the test
injects the answers at the emulator. Prints a summary without any token.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from airflow_papertrail.operators.query import PapertrailQueryOperator


@dag(
    dag_id="papertrail_exact_it",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    # retries on purpose: the unreadable write must still be sent exactly once
    default_args={"retries": 2, "retry_delay": timedelta(seconds=0)},
    params={
        "conn_id": Param("papertrail_it_exact", type="string"),
        "mode": Param("exact", enum=["exact", "unreadable_write"]),
        "query_params": Param({"from_date": "2024-04-01", "limit": "200"}, type="object"),
    },
)
def papertrail_exact_it() -> None:
    @task.branch
    def pick(**context) -> str:
        return "read" if context["params"]["mode"] == "exact" else "write_unreadable"

    read = PapertrailQueryOperator(
        task_id="read",
        module="bank",
        query="bank_list",
        query_params="{{ params.query_params | tojson }}",
        papertrail_conn_id="{{ params.conn_id }}",
    )
    write = PapertrailQueryOperator(
        task_id="write",
        module="customers",
        query="create_customer",
        payload='{"name": "Acme", "amount": 1150.00, "ref": "{{ params.query_params.limit }}"}',
        papertrail_conn_id="{{ params.conn_id }}",
    )
    write_unreadable = PapertrailQueryOperator(
        task_id="write_unreadable",
        module="customers",
        query="create_customer",
        payload={"name": "Acme"},
        papertrail_conn_id="{{ params.conn_id }}",
    )

    @task
    def report(answer: dict) -> None:
        from decimal import Decimal

        record = answer["data"][0]
        print(f"AMOUNT={record['amount']!r} BIG={record['big']!r} DECIMAL={Decimal(record['big'])!r}")

    pick() >> [read, write_unreadable]
    read >> write
    report(read.output)


papertrail_exact_it()
