"""Extract the books of many client organisations from Papertrail-ai, one connection each, daily.

The extraction of ``papertrail_extract`` (the same tasks, files and manifest), once per
client organisation, in a task group mapped over the connection ids. Each organisation
writes below its own folder::

    {base_path}/{conn_id}/{date}/{run_id}/{module}__{query}.jsonl
    {base_path}/{conn_id}/{date}/{run_id}/_MANIFEST.json

(``conn_id`` and ``run_id`` with every character outside ``[A-Za-z0-9._-]`` replaced by
``_``). Read an organisation's newest complete snapshot with
``latest_complete_snapshot(organisation_base_path(base_path, conn_id))`` from
``airflow_papertrail.snapshots``.

**One organisation's failure is its own.** Inside the mapped group every task waits only for
the tasks of its own organisation: a dead grant (consent withdrawn, refresh token revoked)
fails that organisation's extracts with ``ReauthorizationFailure`` (not retried, the message
names the Connect page), its ``write_manifest`` is ``upstream_failed`` and it gets no
manifest; every other organisation's extracts and manifest go on. The run ends ``failed``
when any organisation failed: clear its failed tasks once the grant is reconnected.

Params (set them when triggering):

* ``conn_ids``: the ``papertrail`` connections, a list, one per organisation. Not given
  (the scheduled runs): the JSON list in the Airflow Variable
  ``papertrail_extract_many_conn_ids``, e.g.
  ``airflow variables set papertrail_extract_many_conn_ids '["client_a", "client_b"]'``.
  (Tasks cannot list connections: Airflow 3 tasks have no metadata-DB access.)
* ``base_path``: as in ``papertrail_extract`` (a local directory or an object-storage URL;
  default: the environment variable ``PAPERTRAIL_EXTRACT_BASE_PATH`` of the DAG processor,
  else ``/tmp/papertrail_extract``). **With workers on several hosts it must be shared**
  (object storage or a shared mount): an organisation's files are written by whichever
  workers ran its extracts, and its ``write_manifest`` fails, writing no manifest, when it
  cannot see them all.
* ``query_params``: as in ``papertrail_extract``, sent with every query of every organisation.

Parallelism: at most ``max_active_tasks`` tasks of a run at once (16; the environment
variable ``PAPERTRAIL_EXTRACT_MANY_MAX_ACTIVE_TASKS`` of the DAG processor sets it), in the
pool ``PAPERTRAIL_EXTRACT_MANY_POOL`` (default ``default_pool``): create a pool to bound the
calls to Papertrail-ai across DAGs. ``weight_rule="upstream"`` finishes the organisations
already started (extracts, then their manifest) before starting new ones. See
docs/many-organisations.md.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import Param, dag, task, task_group

from airflow_papertrail.extraction import EXTRACTS, snapshot_params, snapshot_tasks
from airflow_papertrail.snapshots import interval_templates

MAX_ACTIVE_TASKS = int(os.environ.get("PAPERTRAIL_EXTRACT_MANY_MAX_ACTIVE_TASKS", "16"))
POOL = os.environ.get("PAPERTRAIL_EXTRACT_MANY_POOL", "default_pool")


@dag(
    dag_id="papertrail_extract_many",
    schedule="@daily",
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    max_active_tasks=MAX_ACTIVE_TASKS,
    tags=["papertrail"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5), "pool": POOL, "weight_rule": "upstream"},
    params={
        "conn_ids": Param(
            None,
            type=["null", "array"],
            description="Papertrail-ai connections, one per organisation; empty: the Variable papertrail_extract_many_conn_ids",
        ),
        **snapshot_params(),
    },
    user_defined_filters={"interval_templates": interval_templates},
    doc_md=__doc__,
)
def papertrail_extract_many() -> None:
    @task
    def organisations(**context: Any) -> list[str]:
        """The conn_ids param, else the Variable papertrail_extract_many_conn_ids: unique connection ids."""
        from airflow_papertrail.extraction import organisation_conn_ids

        conn_ids = organisation_conn_ids(context["params"].get("conn_ids"))
        print(f"Extracting {len(conn_ids)} organisations: {', '.join(conn_ids)}")
        return conn_ids

    @task_group
    def organisation(conn_id: str) -> None:
        # clear_manifest >> one PapertrailExtractOperator per (module, query) >> write_manifest,
        # in {base_path}/{conn_id}/...; each depends only on its own organisation's tasks.
        snapshot_tasks(conn_id=conn_id, base_path="{{ params.base_path }}", extracts=EXTRACTS, per_organisation=True)

    organisation.expand(conn_id=organisations())


papertrail_extract_many()
