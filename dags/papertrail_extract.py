"""Extract a client organisation's books from Papertrail-ai to JSON-lines files, daily.

Every run writes to its own folder, so a backfill, a rerun or a manual run never mixes
with another run's files::

    {base_path}/{date}/{run_id}/{module}__{query}.jsonl
    {base_path}/{date}/{run_id}/_MANIFEST.json

``date`` is the logical date (the run's ``run_after`` for a manual run without one) and
``run_id`` is the run id with every character outside ``[A-Za-z0-9._-]`` replaced by
``_`` (``:`` and ``+`` break Hadoop/Spark paths).

Tasks: ``clear_manifest`` removes a stale ``_MANIFEST.json`` from the run folder (a cleared
run keeps its run id) and pushes the folder's file paths to XCom, then one extract task per
list or report query, all in parallel, each streaming its records in constant memory (one
JSON record per line, a report is a single line) and pushing only ``{"path", "records",
"bytes"}`` to XCom; a file appears complete or not at all (temporary name, renamed at the
end). Last, ``write_manifest`` writes ``_MANIFEST.json`` (also atomically) once every file
is there: the files with their records, bytes, module, query and modification time, the
query_params sent, the connection, DAG, run id, logical date, data interval, and the
provider version. **A run folder without a manifest is incomplete**: read the latest
complete snapshot with ``airflow_papertrail.snapshots.latest_complete_snapshot(base_path)``.

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

The tasks come from ``airflow_papertrail.extraction.snapshot_tasks``, which
``papertrail_extract_many`` runs once per client organisation. Tokens are never printed:
they only travel in the ``Authorization`` header.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag

from airflow_papertrail.extraction import EXTRACTS, snapshot_params, snapshot_tasks
from airflow_papertrail.snapshots import interval_templates


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
        **snapshot_params(),
    },
    user_defined_filters={"interval_templates": interval_templates},
    doc_md=__doc__,
)
def papertrail_extract() -> None:
    # clear_manifest >> one PapertrailExtractOperator per (module, query) in EXTRACTS >> write_manifest
    snapshot_tasks(conn_id="{{ params.conn_id }}", base_path="{{ params.base_path }}", extracts=EXTRACTS)


papertrail_extract()
