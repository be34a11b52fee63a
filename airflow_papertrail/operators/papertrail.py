"""Operators of the Papertrail-ai provider."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_papertrail.authorization import AuthorizationStore, PendingAuthorization
from airflow_papertrail.oauth.authorize import DEFAULT_AUTHORIZATION_TTL

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from airflow.sdk import Context

#: The api-server's health route, asked whether a triggerer runs (public in Airflow 3).
HEALTH_PATH = "/api/v2/monitor/health"
#: Seconds the authorize task waits for the api-server's health answer (the check is only a hint).
TRIGGERER_CHECK_TIMEOUT = 3.0


class PapertrailAuthorizeOperator(BaseOperator):
    """Start the OAuth 2 authorization-code grant and hand the consent link to a person.

    Creates a pending authorization (256-bit state, PKCE S256 verifier unless the connection
    turns PKCE off, expiry, the run that asked), stores it encrypted, logs the consent URL
    (it carries no secret: client ID, redirect URI, scope, system, state and the PKCE
    *challenge*) and returns::

        {"consent_url": ..., "authorization_id": ..., "conn_id": ..., "expires_at": <epoch s>}

    Pass the ``authorization_id`` to :class:`PapertrailAuthorizationSensor`.

    Given an ``authorization_id`` (the Connect page issues the authorization itself, so that
    the browser reaches the consent page at once, and triggers this DAG to wait for it), the
    task *adopts* that pending authorization instead of issuing a new one: only if it is for
    this connection, still ``pending``, not expired, and was issued for this very DAG run;
    anything else fails the task and issues nothing.

    :param papertrail_conn_id: the ``papertrail`` connection to authorize (templated).
    :param authorization_ttl: seconds the consent link stays valid (default 600).
    :param extra_authorize_params: extra query parameters for the consent URL (templated);
        protocol parameters cannot be overridden.
    :param notifiers: Airflow notifiers (e.g. ``SlackNotifier``, ``SmtpNotifier``) called with
        the task context, in which ``papertrail_consent_url`` and
        ``papertrail_authorization_expires_at`` are available to their templates, e.g.
        ``SlackNotifier(text="Approve Papertrail-ai access: {{ papertrail_consent_url }}")``.
    :param authorization_id: adopt this pending authorization (issued by the Connect page for
        this run) instead of issuing one (templated; empty: issue one).
    :param notify: whether to call ``notifiers`` (templated; ``"False"`` / ``"0"`` / empty turn
        it off). The Connect page turns it off when the person who clicked consents at once.
    """

    template_fields: Sequence[str] = ("papertrail_conn_id", "extra_authorize_params", "authorization_id", "notify")
    ui_color = "#e8f1ff"

    def __init__(
        self,
        *,
        papertrail_conn_id: str = "papertrail_default",
        authorization_ttl: float = DEFAULT_AUTHORIZATION_TTL,
        extra_authorize_params: Mapping[str, str] | None = None,
        notifiers: Sequence[Any] = (),
        authorization_id: str | None = None,
        notify: bool | str = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 30 <= authorization_ttl <= 24 * 3600:
            raise ValueError("authorization_ttl must be between 30 seconds and 24 hours")
        self.papertrail_conn_id = papertrail_conn_id
        self.authorization_ttl = authorization_ttl
        self.extra_authorize_params = dict(extra_authorize_params or {})
        self.notifiers = list(notifiers)
        self.authorization_id = authorization_id
        self.notify = notify

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_papertrail.hooks.papertrail import PapertrailHook, mask

        ti = context.get("ti")
        adopt = (self.authorization_id or "").strip()
        notify = self.notify
        if not adopt or adopt == "None":
            # A DAG file copied before the Connect page existed does not template these two: the
            # run's conf still carries them (otherwise this task would issue a second
            # authorization and nobody would redeem the one the person consented to).
            conf = getattr(context.get("dag_run"), "conf", None) or {}
            adopt = str(conf.get("authorization_id") or "").strip()
            if adopt and "notify" in conf:
                notify = conf["notify"]
        published = True
        if adopt and adopt != "None":  # "None": a template that rendered an unset param
            pending = adopt_pending(
                AuthorizationStore(on_secret=mask),
                adopt,
                conn_id=self.papertrail_conn_id,
                dag_id=getattr(ti, "dag_id", None),
                run_id=getattr(ti, "run_id", None),
                now=time.time(),
            )
            consent_url = str(pending.consent_url)
            # Connect (not "Get a link to send"): the person who clicked is on the consent page
            # already. The link carries the state, so whoever read it (the task log, XCom) could
            # finish this consent with an organisation of their own: it is not published.
            published = _truthy(notify)
        else:
            hook = PapertrailHook(self.papertrail_conn_id)
            client = hook.oauth_client
            client.config.validate(need_redirect_uri=True, conn_id=self.papertrail_conn_id)
            request = client.authorization_request(ttl=self.authorization_ttl, extra_params=self.extra_authorize_params)
            pending = PendingAuthorization.from_request(
                request,
                conn_id=self.papertrail_conn_id,
                expected_issuer=client.config.issuer,
                dag_id=getattr(ti, "dag_id", None),
                run_id=getattr(ti, "run_id", None),
                task_id=getattr(ti, "task_id", None),
            )
            AuthorizationStore(on_secret=mask).save(pending)
            consent_url = request.url
        self._warn_without_triggerer()
        expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(pending.expires_at))
        if published:
            self.log.info(
                "Open this link and approve access for connection %r (valid until %s):\n\n    %s\n",
                self.papertrail_conn_id,
                expires,
                consent_url,
            )
        else:
            self.log.info(
                "Authorization %s for connection %r was started on the Connect page, whose user was sent to the "
                "consent page (valid until %s); the link is not logged.",
                pending.authorization_id[:12],
                self.papertrail_conn_id,
                expires,
            )
        if self.notifiers and _truthy(notify):
            notify_context = dict(context)
            notify_context.update(papertrail_consent_url=consent_url, papertrail_authorization_expires_at=expires)
            for notifier in self.notifiers:
                notifier(notify_context)
        return {
            "consent_url": consent_url if published else None,
            "authorization_id": pending.authorization_id,
            "conn_id": self.papertrail_conn_id,
            "expires_at": pending.expires_at,
        }

    def _warn_without_triggerer(self) -> None:
        """Best effort, never fatal: warn when the api-server reports no healthy triggerer.

        The consent wait defers by default; without a running ``airflow triggerer`` it never
        notices the consent and nothing else would say why.
        """
        import requests

        from airflow_papertrail.refresh import api_server_url

        url = api_server_url(HEALTH_PATH)
        if url is None:
            return
        try:
            response = requests.get(url, timeout=TRIGGERER_CHECK_TIMEOUT, allow_redirects=False)
            status = (response.json().get("triggerer") or {}).get("status") if response.ok else None
        except Exception as exc:  # the check must never fail the task
            self.log.debug("Could not check the triggerer's health at %s: %s", url, type(exc).__name__)
            return
        if not response.ok:
            self.log.debug("Could not check the triggerer's health at %s: HTTP %s", url, response.status_code)
            return
        if status != "healthy":
            self.log.warning(
                "The api-server reports no healthy triggerer (triggerer status: %s). The consent wait "
                "(PapertrailAuthorizationSensor) defers by default and only a running `airflow triggerer` "
                "notices the consent: start one, or pass deferrable=False to the sensor.",
                status or "none",
            )


def _truthy(value: bool | str | None) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in {"", "0", "false", "no", "off", "none"}
    return bool(value)


def adopt_pending(
    store: AuthorizationStore,
    authorization_id: str,
    *,
    conn_id: str,
    dag_id: str | None,
    run_id: str | None,
    now: float,
) -> PendingAuthorization:
    """The pending authorization the Connect page issued for this run; PapertrailError otherwise.

    Nothing is issued or changed here: a wrong id fails the task, so the run never hands out
    (or waits for) an authorization that belongs to another run or connection.
    """
    from airflow_papertrail.authorization import CAPTURED, ERROR, PENDING
    from airflow_papertrail.exceptions import PapertrailError

    short = authorization_id[:12]
    pending = store.load(authorization_id)
    retry = "Start a new authorization from the Connect page (or trigger papertrail_authorize without one)."
    if pending is None:
        raise PapertrailError(
            f"pending authorization {short} does not exist (expired and deleted, or never issued). {retry}"
        )
    if pending.conn_id != conn_id:
        raise PapertrailError(
            f"pending authorization {short} was issued for connection {pending.conn_id!r}, not {conn_id!r}. {retry}"
        )
    if pending.dag_id != dag_id or pending.run_id != run_id:
        raise PapertrailError(
            f"pending authorization {short} was not issued for this DAG run ({dag_id}/{run_id}). {retry}"
        )
    # The person may have consented already (the Connect page sends the browser to the
    # consent page before this task starts): a captured code or error is the sensor's to handle.
    if pending.status not in (PENDING, CAPTURED, ERROR):
        raise PapertrailError(f"pending authorization {short} was already used (it is {pending.status}). {retry}")
    if not pending.consent_url or (pending.status == PENDING and pending.is_expired(now)):
        raise PapertrailError(f"pending authorization {short} has expired. {retry}")
    return pending


# The data operators live in their own module (no HTTP imports at DAG-parse time) and are
# re-exported here, where users look for them.
from airflow_papertrail.operators.query import PapertrailExtractOperator, PapertrailQueryOperator  # noqa: E402

__all__ = ["PapertrailAuthorizeOperator", "PapertrailExtractOperator", "PapertrailQueryOperator"]
