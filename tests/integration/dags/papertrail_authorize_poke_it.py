"""The authorization flow with the sensor in poke mode (the example DAG defers)."""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import BaseNotifier, dag

from airflow_papertrail.operators.papertrail import PapertrailAuthorizeOperator
from airflow_papertrail.sensors.papertrail import PapertrailAuthorizationSensor


class FileNotifier(BaseNotifier):
    """Stands in for SlackNotifier/SmtpNotifier: renders its template and writes it to a file."""

    template_fields = ("message",)

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def notify(self, context) -> None:
        path = os.environ.get("PT_IT_NOTIFY_FILE")
        if path:
            with open(path, "w") as fh:
                fh.write(self.message)


@dag(dag_id="papertrail_authorize_poke_it", schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False)
def papertrail_authorize_poke_it():
    authorize = PapertrailAuthorizeOperator(
        task_id="authorize",
        papertrail_conn_id="papertrail_it",
        notifiers=[
            FileNotifier("Approve: {{ papertrail_consent_url }} until {{ papertrail_authorization_expires_at }}")
        ],
    )
    authorize >> PapertrailAuthorizationSensor(
        task_id="wait_for_consent",
        papertrail_conn_id="papertrail_it",
        authorization_id="{{ ti.xcom_pull(task_ids='authorize')['authorization_id'] }}",
        deferrable=False,
        poke_interval=0.2,
        timeout=120,
    )


papertrail_authorize_poke_it()
