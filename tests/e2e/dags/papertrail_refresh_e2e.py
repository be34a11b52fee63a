"""32 mapped tasks that all need a token of one grant at the same time (E2E refresh proof)."""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import timedelta

import pendulum
import requests
from airflow.sdk import dag, get_current_context, task


@task(retries=2, retry_delay=timedelta(seconds=1))
def use_token(i: int) -> int:
    from airflow_papertrail.hooks.papertrail import PapertrailHook

    ctx = get_current_context()
    ti = ctx["ti"]
    hook = PapertrailHook("papertrail_e2e")
    marker = (ctx["dag_run"].conf or {}).get("kill_one")
    if marker and ti.try_number == 1:
        grant = hook.get_stored_grant()
        if grant is not None and grant.token.is_expired(time.time()):
            # The first task to see the expired token (whichever the scheduler started first) dies
            # 1 s later, while its refresh is in flight (the token endpoint is slowed down by 4 s).
            # The marker tells the test which one it was.
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(ti.map_index).encode())
                os.close(fd)
                threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    token = hook.get_access_token()
    api = hook.config.effective_api_url
    response = requests.get(
        f"{api}/api_company.php",
        params={"system": "xero", "query": "co_details"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        verify=hook.config.verify,
    )
    response.raise_for_status()
    return hook.get_stored_grant().generation


@dag(
    dag_id="papertrail_refresh_e2e",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_tasks=32,
)
def papertrail_refresh_e2e():
    use_token.expand(i=list(range(32)))


papertrail_refresh_e2e()
