"""16 mapped tasks that each need a valid Papertrail-ai token at once (``docker/local-proof.sh --celery``).

Not one of the example DAGs: ``local-proof.sh --celery`` copies it next to the repo's ``dags/``
in its work dir. With the stored grant's access token expired, every task asks for a token at
the same moment on whichever Celery worker picked it up; the api-server's refresh coordinator
(``[papertrail] refresh_coordinator = api-server``) must turn that into exactly one refresh.

"The same moment": tasks start seconds apart (more on a loaded machine), and the first one's
refresh would be stored before the last one even looks. So each task first waits at a barrier
until all ``TASKS`` task instances of the run have started (running or finished, asked through
the Execution API; at most ``BARRIER_TIMEOUT`` seconds), and then until the run's
``conf["release_at"]`` (epoch seconds, if given and still ahead: one instant for every task),
and only then asks for its token.

Each task makes one real data call with the token it got and reports where it ran (hostname),
how many tasks had arrived when it left the barrier, when it left it, and the grant generation
stored after its call. No token is returned or printed.
"""

from __future__ import annotations

import socket
import time

import pendulum
from airflow.sdk import dag, get_current_context, task

CONN_ID = "papertrail_default"
TASKS = 16
BARRIER_TIMEOUT = 300  # seconds
ARRIVED = ["running", "success", "failed", "up_for_retry"]


@task(retries=0)
def use_token(i: int) -> dict:
    from airflow_papertrail.hooks.papertrail import PapertrailHook

    context = get_current_context()
    ti = context["ti"]
    deadline = time.monotonic() + BARRIER_TIMEOUT
    while True:
        arrived = ti.get_ti_count(dag_id=ti.dag_id, task_ids=[ti.task_id], run_ids=[ti.run_id], states=ARRIVED)
        if arrived >= TASKS or time.monotonic() >= deadline:
            break
        time.sleep(1)
    release_at = float((context["dag_run"].conf or {}).get("release_at") or 0)
    time.sleep(max(0.0, min(release_at - time.time(), BARRIER_TIMEOUT)))
    released_at = time.time()
    hook = PapertrailHook(CONN_ID)
    answer = hook.query("company", "co_details")  # gets a valid token first (refreshing if needed)
    grant = hook.get_stored_grant()
    return {
        "i": i,
        "hostname": socket.gethostname(),
        "arrived_at_release": arrived,
        "released_at": released_at,
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
