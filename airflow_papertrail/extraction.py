"""The daily snapshot extraction as Airflow tasks, shared by the extract example DAGs.

:func:`snapshot_tasks` adds one snapshot of a connection's books to the DAG (or task group)
being defined: ``clear_manifest`` (picks the run folder, removes a stale manifest) >> one
:class:`~airflow_papertrail.operators.query.PapertrailExtractOperator` per entry of
:data:`EXTRACTS`, in parallel >> ``write_manifest`` (only when every file is there).
``papertrail_extract`` calls it once; ``papertrail_extract_many`` calls it inside a task
group mapped over connection ids, so every client organisation gets the same tasks, its own
folder (:func:`~airflow_papertrail.snapshots.organisation_base_path`) and its own manifest.

:func:`organisation_conn_ids` is that DAG's list of connections: the ``conn_ids`` param, else
the JSON list in the Airflow Variable :data:`CONN_IDS_VARIABLE`, checked.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from airflow.sdk import task

from airflow_papertrail.operators.query import PapertrailExtractOperator, _fail
from airflow_papertrail.snapshots import organisation_base_path, path_safe, snapshot_folder

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

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

#: The ``query_params`` param rendered as JSON text (native rendering would turn "200" into
#: 200 and "1150.00" into 1150.0); the DAG registers the ``interval_templates`` filter.
QUERY_PARAMS = "{{ params.query_params | interval_templates | tojson }}"

#: The Airflow Variable holding the JSON list of connections ``papertrail_extract_many`` extracts
#: when its run has no ``conn_ids`` param.
CONN_IDS_VARIABLE = "papertrail_extract_many_conn_ids"


def snapshot_params() -> dict[str, Any]:
    """The ``base_path`` and ``query_params`` params of the extract DAGs (new ``Param`` objects).

    ``base_path`` defaults to the environment variable ``PAPERTRAIL_EXTRACT_BASE_PATH`` of the
    process that parses the DAG (the DAG processor), else ``/tmp/papertrail_extract``.
    """
    from airflow.sdk import Param

    return {
        "base_path": Param(
            os.environ.get("PAPERTRAIL_EXTRACT_BASE_PATH", "/tmp/papertrail_extract"),  # noqa: S108 (documented default)
            type="string",
            description="Local directory or storage URL (shared by every worker host)",
        ),
        "query_params": Param(
            {},
            type="object",
            description='Extra query-string parameters for every query, e.g. {"from_date": "{{ data_interval_start | ds }}"}',
        ),
    }


def extract_name(module: str, query: str) -> str:
    """``bank__bank_list``: the extract task's id and its file's name without ``.jsonl``."""
    return f"{module}__{query}"


def snapshot_tasks(
    *,
    conn_id: Any,
    base_path: Any,
    query_params: str = QUERY_PARAMS,
    per_organisation: bool = False,
    extracts: Sequence[tuple[str, str]] = EXTRACTS,
) -> tuple[Any, list[Any], Any]:
    """Add one snapshot extraction to the DAG or task group being defined; returns
    ``(clear_manifest, [extract tasks], write_manifest)``.

    The run folder is ``{base_path}/{date}/{run_id}`` (see :mod:`airflow_papertrail.snapshots`),
    or with ``per_organisation`` ``{base_path}/{conn_id}/{date}/{run_id}``. Inside a mapped task
    group every task depends only on the tasks of its own map index: one organisation's
    failure leaves the others' extracts and manifests alone.

    :param conn_id: the ``papertrail`` connection: a template such as ``"{{ params.conn_id }}"``
        or the argument of a mapped task group.
    :param base_path: a local directory or an object-storage URL (templated).
    :param query_params: JSON text of the query-string parameters every query sends (templated).
    :param per_organisation: put the run folder below a folder named after the connection.
    :param extracts: the (module, query) pairs, one file each.
    """
    sources = {extract_name(module, query): (module, query) for module, query in extracts}

    @task(multiple_outputs=True)
    def clear_manifest(base_path: str, conn_id: str, **context: Any) -> dict[str, str]:
        """The run folder and every file's path in it (XCom). A cleared run writes into the same
        folder: its old manifest must not vouch for new files, so it is removed first."""
        from airflow_papertrail.snapshots import remove_stale_manifest

        dag_run = context["dag_run"]
        base = organisation_base_path(base_path, conn_id) if per_organisation else base_path
        # Manual runs in Airflow 3 have no logical date: run_after then.
        folder = snapshot_folder(base, dag_run.logical_date or dag_run.run_after, dag_run.run_id)
        if remove_stale_manifest(folder):
            print(f"Removed the previous _MANIFEST.json of {folder}")
        return {"folder": folder, **{name: f"{folder}/{name}.jsonl" for name in sources}}

    @task
    def write_manifest(
        folder: str, files: dict[str, Any], query_params: str, conn_id: str, **context: Any
    ) -> dict[str, Any]:
        """Runs only when every extract succeeded (all_success): its manifest marks the folder complete."""
        from airflow_papertrail.snapshots import write_manifest as write

        dag_run = context["dag_run"]
        manifest = write(
            folder,
            [{**result, "module": sources[name][0], "query": sources[name][1]} for name, result in files.items()],
            query_params=json.loads(query_params),
            conn_id=conn_id,
            dag_id=dag_run.dag_id,
            run_id=dag_run.run_id,
            logical_date=dag_run.logical_date,
            data_interval=(dag_run.data_interval_start, dag_run.data_interval_end),
        )
        print(f"Wrote {folder}/_MANIFEST.json: {len(manifest['files'])} files")
        return {"folder": folder, "files": len(manifest["files"])}

    paths: Any = clear_manifest(base_path, conn_id)  # a PlainXComArg: paths[name] is one of its XComs
    tasks = {
        name: PapertrailExtractOperator(
            task_id=name,
            papertrail_conn_id=conn_id,
            module=module,
            query=query,
            destination=paths[name],
            query_params=query_params,
        )
        for name, (module, query) in sources.items()
    }
    last = write_manifest(paths["folder"], {name: op.output for name, op in tasks.items()}, query_params, conn_id)
    return paths, list(tasks.values()), last


# ---------------------------------------------------------------------------------------
# which connections papertrail_extract_many extracts
# ---------------------------------------------------------------------------------------
def organisation_conn_ids(
    value: Any, *, variable: str = CONN_IDS_VARIABLE, read_variable: Callable[[str], str | None] | None = None
) -> list[str]:
    """The connections of one ``papertrail_extract_many`` run, checked.

    :param value: the ``conn_ids`` param: a list of connection ids; ``None`` or ``[]`` means
        "not given": then the JSON list in the Airflow Variable ``variable``.
    :param variable: the Variable's key (default :data:`CONN_IDS_VARIABLE`; a copy of the DAG
        for another part of a long list reads its own).
    :param read_variable: returns a Variable's text or ``None`` (default: ``Variable.get``).
    :raises AirflowFailException: no list anywhere, or a list that is not a list of unique,
        non-empty connection ids (not retried: the same list would fail again).
    """
    source = "the conn_ids param"
    if value is None or (isinstance(value, (list, tuple)) and not value):
        text = (read_variable or _read_variable)(variable)
        if text is None:
            raise _fail(
                f"no connections to extract: set the Airflow Variable {variable} to a JSON list of "
                f"papertrail connection ids (airflow variables set {variable} "
                """'["client_a", "client_b"]'), or trigger the DAG with the conn_ids param, e.g. conf """
                '{"conn_ids": ["client_a", "client_b"]}'
            )
        source = f"the Airflow Variable {variable}"
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise _fail(
                f"{source} is not JSON ({exc}): set it to a JSON list of papertrail connection ids, "
                'e.g. ["client_a", "client_b"]'
            ) from None
    return _checked_conn_ids(value, source)


def _checked_conn_ids(value: Any, source: str) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise _fail(
            f"{source} must be a list of papertrail connection ids, e.g. "
            f'["client_a", "client_b"], got {type(value).__name__}'
        )
    if not value:
        raise _fail(f"{source} is an empty list: give at least one papertrail connection id")
    for index, conn_id in enumerate(value):
        if not isinstance(conn_id, str) or not conn_id.strip() or conn_id != conn_id.strip():
            raise _fail(
                f"{source}[{index}] is {json.dumps(conn_id)[:80]}: every item must be a papertrail "
                "connection id, a non-empty string without surrounding spaces"
            )
    repeated = sorted({c for c in value if value.count(c) > 1})
    if repeated:
        raise _fail(
            f"{source} lists {', '.join(map(repr, repeated))} more than once: each organisation's "
            "connection may appear only once (its tasks would write to the same folder)"
        )
    folders: dict[str, str] = {}
    for conn_id in value:
        other = folders.setdefault(path_safe(conn_id), conn_id)
        if other != conn_id:
            raise _fail(
                f"{source}: {other!r} and {conn_id!r} would share the output folder {path_safe(conn_id)!r} "
                "(every character outside [A-Za-z0-9._-] becomes _): rename one of the connections"
            )
    limit = _max_map_length()
    if len(value) > limit:
        raise _fail(
            f"{source} lists {len(value)} connections, more than [core] max_map_length = {limit}, the most "
            "one mapped task group may expand to: raise max_map_length or split the list over several DAGs"
        )
    return list(value)


def _read_variable(key: str) -> str | None:
    from airflow.sdk import Variable

    text = Variable.get(key, default=None)
    return None if text is None else str(text)


def _max_map_length() -> int:
    from airflow.sdk import conf

    return conf.getint("core", "max_map_length", fallback=1024)


__all__ = [
    "CONN_IDS_VARIABLE",
    "EXTRACTS",
    "QUERY_PARAMS",
    "extract_name",
    "organisation_conn_ids",
    "snapshot_params",
    "snapshot_tasks",
]
