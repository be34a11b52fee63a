"""Keep Papertrail-ai grants alive and say when one needs a person (daily).

For every ``papertrail`` connection (or those in the ``conn_ids`` param):

* refreshes the grant if it was not refreshed for 7 days (``idle_refresh_after``), through
  the same serialized refresh path as every task: accounting systems let idle grants die
  (Sage after about 31 days, Xero 60, QuickBooks 100);
* calls the notifiers **once per change**: when a stated refresh-token expiry comes within
  14 days (``warning_horizon``), and when a grant needs re-authorization, with the
  connection, the reason and the Connect page link;
* fails if a grant needs re-authorization (``fail_on_attention``), so the DAG's own
  ``on_failure_callback`` fires too;
* emits an asset event on ``papertrail://grants/<conn_id>`` per change when it succeeds
  (``emit_asset_events``): schedule a fix-up DAG on it.

Params: ``conn_ids``: connections to check, comma-separated; empty checks all of them.

Replace ``LogNotifier`` with your own notifiers, e.g. ``SlackNotifier`` or
``SmtpNotifier``; their templates see ``papertrail_conn_id``, ``papertrail_attention``,
``papertrail_reason``, ``papertrail_connect_url``, ``papertrail_refresh_expires_at``...
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import BaseNotifier, Param, dag

from airflow_papertrail.operators.grant_health import PapertrailGrantHealthOperator


class LogNotifier(BaseNotifier):
    """Writes the alert to the task log (stands in for Slack, SMTP, Apprise...)."""

    template_fields = ("message",)

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def notify(self, context) -> None:
        print(f"PAPERTRAIL ALERT: {self.message}")


ALERT = LogNotifier(
    "Papertrail-ai connection {{ papertrail_conn_id }}: {{ papertrail_attention }} "
    "({{ papertrail_reason }}). Reconnect it at {{ papertrail_connect_url }}"
)


@dag(
    dag_id="papertrail_grant_health",
    schedule="@daily",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["papertrail"],
    params={
        "conn_ids": Param(
            "",
            type="string",
            description="Papertrail-ai connections to check, comma-separated; empty: every papertrail connection",
        )
    },
    doc_md=__doc__,
)
def papertrail_grant_health():
    PapertrailGrantHealthOperator(
        task_id="check_grants",
        conn_ids="{{ params.conn_ids }}",
        notifiers=[ALERT],
        idle_refresh_after=timedelta(days=7),
        warning_horizon=timedelta(days=14),
        fail_on_attention=True,
    )


papertrail_grant_health()
