"""Extract a client organisation's books from Papertrail-ai to JSON-lines files, daily.

Every run writes to its own folder, so a backfill, a rerun or a manual run never mixes
with another run's files::

    {base_path}/{date}/{run_id}/{module}__{query}.jsonl
    {base_path}/{date}/{run_id}/_MANIFEST.json

``date`` is the logical date (the run's ``run_after`` for a manual run without one) and
``run_id`` is the run id with every character outside ``[A-Za-z0-9._-]`` replaced by
``_`` (``:`` and ``+`` break Hadoop/Spark paths).

Tasks: ``clear_manifest`` removes a stale ``_MANIFEST.json`` from the run folder (a cleared
run keeps its run id), then one extract task per list or report query, all in parallel,
each streaming its records in constant memory (one JSON record per line, a report is a
single line) and pushing only ``{"path", "records", "bytes"}`` to XCom; a file appears
complete or not at all (temporary name, renamed at the end). Last, ``write_manifest``
writes ``_MANIFEST.json`` (also atomically) once every file is there: the files with
their records, bytes, module, query and modification time, the query_params sent, the
connection, DAG, run id, logical date, data interval, and the provider version. **A run
folder without a manifest is incomplete**: read the latest complete snapshot with
``airflow_papertrail.snapshots.latest_complete_snapshot(base_path)``.

Params (set them when triggering):

* ``conn_id``: the ``papertrail`` connection; authorize it once with the
  ``papertrail_authorize`` DAG.
* ``base_path``: a local directory, or an object-storage URL such as
  ``s3://aws_conn@bucket/papertrail`` (any ``ObjectStoragePath``). Defaults to the
  environment variable ``PAPERTRAIL_EXTRACT_BASE_PATH`` of the DAG processor, else
  ``/tmp/papertrail_extract``.
* ``query_params``: extra query-string parameters sent with every query, passed as JSON
  (values stay exactly as given: ``"1150.00"`` is sent as ``1150.00``). Papertrail-ai
  documents no date-range parameters, so none are sent by default. For an accounting
  system whose queries take one, template the run's data interval into the values, e.g.
  ``{"from_date": "{{ data_interval_start | ds }}", "to_date": "{{ data_interval_end | ds }}"}``
  (in scope: ``data_interval_start``, ``data_interval_end``, ``logical_date``,
  ``run_after``, ``ds``, ``ts``, ``run_id``; filters ``ds``, ``ds_nodash``, ``ts``).

Tokens are never printed: they only travel in the ``Authorization`` header.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import Param, dag, task

from airflow_papertrail.operators.query import PapertrailExtractOperator
from airflow_papertrail.snapshots import interval_templates, snapshot_folder

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

# The run folder; manual runs in Airflow 3 have no logical date (no ``ds``): run_after then.
RUN_FOLDER = "{{ snapshot_folder(params.base_path, dag_run.logical_date or dag_run.run_after, run_id) }}"
# JSON, rendered as a string: native rendering would turn "200" into 200 and "1150.00" into 1150.0.
QUERY_PARAMS = "{{ params.query_params | interval_templates | tojson }}"


@dag(
    dag_id="papertrail_extract",
    schedule="@daily",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["papertrail"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5)},
    params={
        "conn_id": Param("papertrail_default", type="string", description="Papertrail-ai connection"),
        "base_path": Param(DEFAULT_BASE_PATH, type="string", description="Local directory or storage URL"),
        "query_params": Param(
            {},
            type="object",
            description='Extra query-string parameters for every query, e.g. {"from_date": "{{ data_interval_start | ds }}"}',
        ),
    },
    user_defined_macros={"snapshot_folder": snapshot_folder},
    user_defined_filters={"interval_templates": interval_templates},
    doc_md=__doc__,
)
def papertrail_extract() -> None:
    @task
    def clear_manifest(folder: str) -> None:
        """A cleared run writes into the same folder: its old manifest must not vouch for new files."""
        from airflow_papertrail.snapshots import remove_stale_manifest

        if remove_stale_manifest(folder):
            print(f"Removed the previous _MANIFEST.json of {folder}")

    @task
    def write_manifest(folder: str, files: dict[str, Any], query_params: str, **context: Any) -> dict[str, Any]:
        """Runs only when every extract succeeded (all_success): its manifest marks the folder complete."""
        import json

        from airflow_papertrail.snapshots import write_manifest as write

        sources = {f"{m}__{q}": (m, q) for m, q in EXTRACTS}
        dag_run = context["dag_run"]
        manifest = write(
            folder,
            [
                {**result, "module": sources[task_id][0], "query": sources[task_id][1]}
                for task_id, result in files.items()
            ],
            query_params=json.loads(query_params),
            conn_id=context["params"]["conn_id"],
            dag_id=dag_run.dag_id,
            run_id=dag_run.run_id,
            logical_date=dag_run.logical_date,
            data_interval=(dag_run.data_interval_start, dag_run.data_interval_end),
        )
        print(f"Wrote {folder}/_MANIFEST.json: {len(manifest['files'])} files")
        return {"folder": folder, "files": len(manifest["files"])}

    extracts = [
        PapertrailExtractOperator(
            task_id=f"{module}__{query}",
            papertrail_conn_id="{{ params.conn_id }}",
            module=module,
            query=query,
            destination=RUN_FOLDER + f"/{module}__{query}.jsonl",
            query_params=QUERY_PARAMS,
        )
        for module, query in EXTRACTS
    ]
    first = clear_manifest(RUN_FOLDER)
    last = write_manifest(RUN_FOLDER, {op.task_id: op.output for op in extracts}, QUERY_PARAMS)
    first >> extracts
    extracts >> last


papertrail_extract()
