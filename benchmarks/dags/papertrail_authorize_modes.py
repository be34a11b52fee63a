"""Benchmark DAGs: the example DAG's first two steps, with the sensor deferred and poking."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param

from airflow_papertrail.operators.papertrail import PapertrailAuthorizeOperator
from airflow_papertrail.sensors.papertrail import PapertrailAuthorizationSensor

for mode, deferrable in (("deferrable", True), ("poke", False)):
    with DAG(
        dag_id=f"bench_authorize_{mode}",
        schedule=None,
        start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
        catchup=False,
        params={"conn_id": Param("papertrail_default", type="string")},
    ):
        authorize = PapertrailAuthorizeOperator(task_id="authorize", papertrail_conn_id="{{ params.conn_id }}")
        authorize >> PapertrailAuthorizationSensor(
            task_id="wait_for_consent",
            papertrail_conn_id="{{ params.conn_id }}",
            authorization_id="{{ ti.xcom_pull(task_ids='authorize')['authorization_id'] }}",
            deferrable=deferrable,
            poke_interval=0.25,
        )
