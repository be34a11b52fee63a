"""What the Connect button does on the api-server: issue the authorization, trigger the DAG.

The api-server issues the pending authorization itself (the same request the authorize task
builds), so that it can send the browser to the consent page at once, and triggers a run of
``papertrail_authorize`` whose ``authorize`` task *adopts* it (``authorization_id`` in the
run's conf) and whose deferred sensor redeems the code: the api-server never exchanges a
code, there is one exchange path. If the DAG is missing or paused, or cannot take another
run, nothing is issued (or what was issued is deleted again).
"""

from __future__ import annotations

import inspect
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_papertrail.authorization import AuthorizationStore, PendingAuthorization
from airflow_papertrail.exceptions import PapertrailError
from airflow_papertrail.oauth.authorize import DEFAULT_AUTHORIZATION_TTL

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

AUTHORIZE_DAG_ID = "papertrail_authorize"
AUTHORIZE_TASK_ID = "authorize"
ORIGIN_CONNECT = "connect"


class ConnectRefused(PapertrailError):
    """The Connect action cannot start an authorization; the message is shown on the page."""


@dataclass(frozen=True)
class Started:
    """An authorization the Connect page issued (plain values; the URL carries no secret)."""

    conn_id: str
    consent_url: str
    authorization_id: str
    run_id: str
    expires_at: float


def new_run_id(now: float) -> str:
    """A run id matching Airflow's default ``allowed_run_id_pattern`` (no conn_id in it)."""
    return f"connect__{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}__{secrets.token_hex(4)}"


def check_dag_can_run(dag_id: str = AUTHORIZE_DAG_ID) -> None:
    """ConnectRefused unless ``dag_id`` is deployed, unpaused and below ``max_active_runs``."""
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from sqlalchemy import func, select

    with create_session() as session:
        dag = session.scalar(select(DagModel).where(DagModel.dag_id == dag_id))
        if dag is None or getattr(dag, "is_stale", False) or not getattr(dag, "is_active", True):
            raise ConnectRefused(
                f"The {dag_id} DAG is not deployed, so nothing could wait for the consent; nothing was started. "
                f"Copy it into your DAGs folder (python -m airflow_papertrail.example_dags <dags folder>)."
            )
        if getattr(dag, "has_import_errors", False):
            raise ConnectRefused(f"The {dag_id} DAG has import errors; nothing was started. Fix it and retry.")
        if dag.is_paused:
            raise ConnectRefused(f"The {dag_id} DAG is paused; nothing was started. Unpause it and retry.")
        limit = dag.max_active_runs
        if limit:
            active = session.scalar(
                select(func.count())
                .select_from(DagRun)
                .where(DagRun.dag_id == dag_id, DagRun.state.in_([DagRunState.QUEUED, DagRunState.RUNNING]))
            )
            if (active or 0) >= limit:
                raise ConnectRefused(
                    f"The {dag_id} DAG already has {active} active run(s) (max_active_runs={limit}); a new one "
                    "would wait in the queue while its consent link expires. Finish the open consent (or mark "
                    "that run failed) and retry."
                )


def trigger_run(dag_id: str, run_id: str, conf: dict[str, Any], user_name: str | None) -> None:
    """Create the run with Airflow's own ``trigger_dag`` (what the CLI and TriggerDagRunOperator use)."""
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.utils.types import DagRunTriggeredByType

    kwargs: dict[str, Any] = {
        "run_id": run_id,
        "conf": conf,
        "triggered_by": getattr(DagRunTriggeredByType, "UI", DagRunTriggeredByType.REST_API),
    }
    if "triggering_user_name" in inspect.signature(trigger_dag).parameters:
        kwargs["triggering_user_name"] = user_name
    trigger_dag(dag_id, **kwargs)


def _server_client(conn_id: str) -> Any:
    """The connection's OAuth client as the api-server sees it (validated, with a redirect URI)."""
    from airflow.models.connection import Connection

    from airflow_papertrail.hooks.papertrail import config_from_connection, mask_in_api_server
    from airflow_papertrail.oauth.client import OAuthClient

    try:
        conn = Connection.get_connection_from_secrets(conn_id)
    except Exception:
        raise ConnectRefused(f"Connection {conn_id!r} is not defined on the api-server; nothing was started.") from None
    mask_in_api_server(conn.password)
    try:
        config = config_from_connection(conn).validate(need_redirect_uri=True, conn_id=conn_id)
    except PapertrailError as exc:
        raise ConnectRefused(f"{exc} Nothing was started; edit the connection and retry.") from None
    return OAuthClient(config, on_secret=mask_in_api_server)


def start_authorization(
    conn_id: str,
    *,
    user_name: str | None,
    notify: bool,
    store: AuthorizationStore | None = None,
    client_for: Callable[[str], Any] = _server_client,
    check_dag: Callable[[], None] = check_dag_can_run,
    trigger: Callable[[str, str, dict[str, Any], str | None], None] = trigger_run,
    clock: Callable[[], float] = time.time,
    ttl: float = DEFAULT_AUTHORIZATION_TTL,
) -> Started:
    """Issue a pending authorization for ``conn_id`` and trigger the run that waits for it."""
    if store is None:
        from airflow_papertrail.hooks.papertrail import mask_in_api_server
        from airflow_papertrail.token_store import OrmVariables

        store = AuthorizationStore(backend=OrmVariables(), on_secret=mask_in_api_server)
    check_dag()
    client = client_for(conn_id)
    request = client.authorization_request(ttl=ttl)
    run_id = new_run_id(clock())
    pending = PendingAuthorization.from_request(
        request,
        conn_id=conn_id,
        expected_issuer=client.config.issuer,
        dag_id=AUTHORIZE_DAG_ID,
        run_id=run_id,
        task_id=AUTHORIZE_TASK_ID,
        origin=ORIGIN_CONNECT,
    )
    store.save(pending)
    conf = {"conn_id": conn_id, "authorization_id": pending.authorization_id, "notify": notify}
    try:
        trigger(AUTHORIZE_DAG_ID, run_id, conf, user_name)
    except Exception as exc:
        try:
            store.delete(pending.authorization_id)
        except Exception:  # the entry expires unused anyway
            log.warning("Could not delete the unused pending authorization %s.", pending.authorization_id[:12])
        log.warning("Connect page: could not trigger %s for %r: %s", AUTHORIZE_DAG_ID, conn_id, type(exc).__name__)
        raise ConnectRefused(
            f"The {AUTHORIZE_DAG_ID} DAG could not be triggered ({type(exc).__name__}: {str(exc)[:200]}); "
            "nothing was started."
        ) from None
    log.info(
        "Connect page: authorization %s for connection %r started by %s (run %s).",
        pending.authorization_id[:12],
        conn_id,
        user_name,
        run_id,
    )
    return Started(conn_id, request.url, pending.authorization_id, run_id, pending.expires_at)
