"""Extract a client organisation's books from Papertrail-ai to JSON-lines files, daily.

One task per list or report query, all independent (they run in parallel). Each streams
its records to ``{base_path}/{date}/{module}__{query}.jsonl`` (``date`` = the logical date, or the run's ``run_after`` for manual runs), one JSON record per line (a
report is a single line), in constant memory, and pushes only ``{"path", "records",
"bytes"}`` to XCom. A file appears complete or not at all: it is written under a temporary
name and renamed at the end.

Params (set them when triggering):

* ``conn_id``: the ``papertrail`` connection; authorize it once with the
  ``papertrail_authorize`` DAG.
* ``base_path``: a local directory, or an object-storage URL such as
  ``s3://aws_conn@bucket/papertrail`` (any ``ObjectStoragePath``). Defaults to the
  environment variable ``PAPERTRAIL_EXTRACT_BASE_PATH`` of the DAG processor, else
  ``/tmp/papertrail_extract``.
* ``query_params``: extra query-string parameters sent with every query (e.g. a date
  range, when the accounting system supports one).

Tokens are never printed: they only travel in the ``Authorization`` header.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag

from airflow_papertrail.operators.query import PapertrailExtractOperator

#: (module, query) pairs extracted every day: every documented list, and the four reports.
EXTRACTS: tuple[tuple[str, str], ...] = (
    ("bank", "bank_list"),
    ("bank", "bank_accounts_list"),
    ("customers", "list_customers"),
    ("customers", "list_invoices"),
    ("vendors", "list_vendors"),
    ("vendors", "list_invoices"),
    ("gl", "list_gl_accounts"),
    ("gl", "list_gl_transaction"),
    ("reports", "trial_balance"),
    ("reports", "income_statement"),
    ("reports", "balance_sheet"),
    ("reports", "cash_flow"),
)

DEFAULT_BASE_PATH = os.environ.get("PAPERTRAIL_EXTRACT_BASE_PATH", "/tmp/papertrail_extract")


@dag(
    dag_id="papertrail_extract",
    schedule="@daily",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["papertrail"],
    # query_params is a dict param: render "{{ params.query_params }}" as a dict, not its repr.
    render_template_as_native_obj=True,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5)},
    params={
        "conn_id": Param("papertrail_default", type="string", description="Papertrail-ai connection"),
        "base_path": Param(DEFAULT_BASE_PATH, type="string", description="Local directory or storage URL"),
        "query_params": Param({}, type="object", description="Extra query-string parameters for every query"),
    },
    doc_md=__doc__,
)
def papertrail_extract() -> None:
    for module, query in EXTRACTS:
        PapertrailExtractOperator(
            task_id=f"{module}__{query}",
            papertrail_conn_id="{{ params.conn_id }}",
            module=module,
            query=query,
            # Manual runs in Airflow 3 have no logical date (no ``ds``): fall back to run_after.
            destination="{{ params.base_path.rstrip('/') }}/{{ (dag_run.logical_date or dag_run.run_after).strftime('%Y-%m-%d') }}/"
            + f"{module}__{query}.jsonl",
            query_params="{{ params.query_params }}",
        )


papertrail_extract()
