"""Integration DAG: code exchange, refresh and key rotation through real Airflow Variables.

Run by tests/integration/test_token_store_airflow.py with ``python <this file> <mode>``
(``dag.test()``); nothing here prints or returns a token.
"""

from __future__ import annotations

import os
import sys

from airflow.sdk import dag, task

CONN_ID = "papertrail_it"


@task
def exchange() -> dict:
    from airflow_papertrail.hooks.papertrail import PapertrailHook

    hook = PapertrailHook(CONN_ID)
    token = hook.oauth_client.exchange_code(os.environ["PT_IT_CODE"])
    grant = hook.token_store.save(token)
    print(f"exchanged: generation={grant.generation} token={grant.token!r}")
    return {"generation": grant.generation, "expires_at": grant.token.expires_at}


@task
def refresh(previous: dict) -> dict:
    from airflow_papertrail.hooks.papertrail import PapertrailHook

    hook = PapertrailHook(CONN_ID)
    stored = hook.token_store.load()
    assert stored is not None and stored.generation == previous["generation"]
    new = hook.oauth_client.refresh(stored.token.refresh_token, previous=stored.token)
    grant = hook.token_store.save(new, based_on=stored)
    print(f"refreshed: generation={grant.generation}")
    return {"generation": grant.generation, "expires_at": grant.token.expires_at}


@task
def rotate_keys() -> bool:
    from airflow_papertrail.hooks.papertrail import PapertrailHook

    return PapertrailHook(CONN_ID).token_store.rotate_keys()


@task
def read() -> dict:
    from airflow_papertrail.hooks.papertrail import PapertrailHook

    stored = PapertrailHook(CONN_ID).token_store.load()
    assert stored is not None
    return {"generation": stored.generation}


@task
def check_connection() -> list:
    from airflow_papertrail.hooks.papertrail import PapertrailHook

    ok, message = PapertrailHook(CONN_ID).test_connection()
    print(f"test_connection: ok={ok} message={message}")
    return [ok, message]


@dag(dag_id="papertrail_token_store_it", schedule=None, catchup=False)
def exchange_and_refresh():
    refresh(exchange()) >> check_connection()


@dag(dag_id="papertrail_token_store_rotate_it", schedule=None, catchup=False)
def rotate():
    rotate_keys()


@dag(dag_id="papertrail_token_store_read_it", schedule=None, catchup=False)
def read_only():
    read()


DAGS = {"exchange": exchange_and_refresh(), "rotate": rotate(), "read": read_only()}

if __name__ == "__main__":
    run = DAGS[sys.argv[1]].test()
    print(f"DAGRUN_STATE={run.state}")
    sys.exit(0 if str(run.state) in ("success", "DagRunState.SUCCESS") else 1)
