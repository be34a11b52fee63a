"""16 mapped tasks that each need a valid Papertrail-ai token at once (``docker/local-proof.sh --celery``).

Not one of the example DAGs: ``local-proof.sh --celery`` copies it next to the repo's ``dags/``
in its work dir. With the stored grant's access token expired, every task asks for a token at
the same moment on whichever Celery worker picked it up; the api-server's refresh coordinator
(``[papertrail] refresh_coordinator = api-server``) must turn that into exactly one refresh.

Each task makes one real data call with the token it got and reports where it ran (hostname)
and the grant generation stored after its call. No token is returned or printed.
"""

from __future__ import annotations

import socket

import pendulum
from airflow.sdk import dag, task

CONN_ID = "papertrail_default"
TASKS = 16


@task(retries=0)
def use_token(i: int) -> dict:
    from airflow_papertrail.hooks.papertrail import PapertrailHook

    hook = PapertrailHook(CONN_ID)
    answer = hook.query("company", "co_details")  # gets a valid token first (refreshing if needed)
    grant = hook.get_stored_grant()
    return {
        "i": i,
        "hostname": socket.gethostname(),
        "generation": grant.generation if grant else None,
        "answered": type(answer).__name__,
    }


@dag(
    dag_id="papertrail_refresh_proof",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_tasks=TASKS,
    tags=["papertrail", "local-proof"],
    doc_md=__doc__,
)
def papertrail_refresh_proof():
    use_token.expand(i=list(range(TASKS)))


papertrail_refresh_proof()
