"""Connect Airflow to a client organisation's books through Papertrail-ai.

Trigger it (optionally with ``conn_id``), open the consent link printed by the
``authorize`` task (also in its XCom), click Allow: the ``wait_for_consent`` task
completes the exchange while deferred and ``report_grant`` shows the grant's expiry and
scopes. Tokens are never printed.

The Connect page (``/papertrail/connections``) triggers this DAG too: it issues the
authorization itself, sends the browser to the consent page at once, and passes
``authorization_id`` (which ``authorize`` then adopts instead of issuing a new one) and
``notify`` (whether ``authorize`` calls its notifiers with the consent link).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from airflow_papertrail.operators.papertrail import PapertrailAuthorizeOperator
from airflow_papertrail.sensors.papertrail import PapertrailAuthorizationSensor


@dag(
    dag_id="papertrail_authorize",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    # Several organisations may be connected at the same time (the Connect page starts one run per
    # click; a run waits up to authorization_ttl for its consent).
    max_active_runs=16,
    tags=["papertrail"],
    params={
        "conn_id": Param("papertrail_default", type="string", description="Papertrail-ai connection to authorize"),
        "authorization_id": Param(
            "", type="string", description="Set by the Connect page: the authorization it issued (leave empty)"
        ),
        "notify": Param(True, type="boolean", description="Send the consent link through the authorize notifiers"),
    },
    doc_md=__doc__,
)
def papertrail_authorize():
    authorize = PapertrailAuthorizeOperator(
        task_id="authorize",
        papertrail_conn_id="{{ params.conn_id }}",
        authorization_id="{{ params.authorization_id }}",
        notify="{{ params.notify }}",
        # notifiers=[SlackNotifier(text="Approve Papertrail-ai access: {{ papertrail_consent_url }}")],
    )

    wait = PapertrailAuthorizationSensor(
        task_id="wait_for_consent",
        papertrail_conn_id="{{ params.conn_id }}",
        authorization_id="{{ ti.xcom_pull(task_ids='authorize')['authorization_id'] }}",
    )

    @task
    def report_grant(params=None) -> dict:
        from airflow_papertrail.hooks.papertrail import PapertrailHook

        grant = PapertrailHook(params["conn_id"]).get_stored_grant()
        if grant is None:
            raise RuntimeError("no grant stored")
        expires = pendulum.from_timestamp(grant.token.expires_at).to_iso8601_string()
        print(
            f"Grant of {params['conn_id']!r}: generation {grant.generation}, access token valid until {expires}, scope {grant.token.scope!r}"
        )
        return {
            "conn_id": params["conn_id"],
            "generation": grant.generation,
            "expires_at": expires,
            "scope": grant.token.scope,
        }

    authorize >> wait >> report_grant()


papertrail_authorize()
