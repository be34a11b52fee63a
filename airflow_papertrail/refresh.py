"""Valid access tokens for every task: proactive refresh, serialized across processes and machines.

Why this shape (Airflow 3 tasks have no DB access, no lock and no compare-and-set on
Variables): the one place that can serialize over the grant is the api-server, which owns
the metadata DB. So a worker that needs a refresh asks the api-server's plugin (``POST
/papertrail/token``); the plugin claims the refresh in one short transaction under the
grant's row lock (only if :func:`plan` says the generation the worker saw is due),
presents the refresh token with no transaction held, stores the new grant in a second
short transaction, and answers with the new access token. 32 tasks that see the same
expired token cause exactly one refresh; the others wait (asynchronously, holding nothing)
and get the stored result.

The request and the answer are Fernet tickets made with ``[papertrail]
token_encryption_keys`` (60 s/300 s lifetime, the answer bound to the request by a nonce):
only our own components can ask, and the access token never crosses the network in the
clear. Workers whose coordinator provably does not exist (the connection is refused, or
the api-server answers Starlette's own 404/405: ``dag.test()``, a laptop) fall back to a
single flight per machine (a thread lock plus an ``flock``); ``[papertrail]
refresh_coordinator`` forces either path.

A refresh whose answer was lost (timeout, reset, any 5xx, an unparseable 2xx) may already
have rotated the token at the server. It is never re-sent automatically: the grant counts
the loss and keeps its access token in use until it expires; after a quiet period the same
refresh token is presented once more; a refusal or a second loss in a row asks for
re-authorization (docs/token-custody.md, "A lost refresh answer").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from airflow_papertrail.exceptions import (
    EncryptionKeyMissing,
    InvalidGrantError,
    PapertrailConfigurationError,
    PapertrailError,
    ReauthorizationRequired,
    RefreshOutcomeUnknown,
    TransientOAuthError,
)
from airflow_papertrail.oauth.envelope import StaleTicket, TicketError, open_ticket, seal_ticket
from airflow_papertrail.oauth.tokens import Token
from airflow_papertrail.token_store import CONFIG_SECTION, grant_variable_key

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from airflow_papertrail.hooks.papertrail import PapertrailHook
    from airflow_papertrail.oauth.client import OAuthClient
    from airflow_papertrail.oauth.config import OAuthClientConfig
    from airflow_papertrail.plugins.locking import EntryAccess
    from airflow_papertrail.token_store import StoredGrant, VariableTokenStore

log = logging.getLogger(__name__)

#: The route's answer when the api-server cannot serve refreshes because of its own
#: configuration (no key, a connection it cannot use): never confused with a bad ticket.
SERVER_MISCONFIGURED = "server_misconfigured"
REQUEST_PURPOSE = "papertrail-refresh-request"
RESPONSE_PURPOSE = "papertrail-refresh-response"
COORDINATOR_PATH = "/papertrail/token"
#: The worker waits longer than the api-server's own token call (including its retries).
COORDINATOR_TIMEOUT = 180.0
#: Seconds a request ticket is accepted (it is opened on arrival, before any lock wait).
REQUEST_TICKET_TTL = 60
#: Seconds an answer ticket is accepted (the refresh itself can take that long).
RESPONSE_TICKET_TTL = 300
#: Starlette's own answers when the api-server has no such route (no plugin loaded): the only
#: non-coordinator answers that prove nothing can be refreshing there (POST on the UI's GET
#: catch-all gives 405). A proxy's or load balancer's page proves nothing of the kind.
NO_ROUTE_ANSWERS = {404: {"detail": "Not Found"}, 405: {"detail": "Method Not Allowed"}}


class CoordinatorUnavailable(PapertrailError):
    """No api-server plugin answered (nothing was sent, or the route does not exist).

    ``refused``: the connection was refused (an api-server or proxy down or restarting: a retry
    may succeed); otherwise no coordinator URL is configured or the api-server has no such route
    (a configuration to fix)."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


#: Lost refresh answers in a row after which the grant needs consent again (see
#: token-custody.md): one may be the server's fault before it rotated (one more try
#: recovers), two in a row is no longer worth presenting the token for.
MAX_UNKNOWN_REFRESH_OUTCOMES = 2

USE = "use"
REFRESH = "refresh"
#: Seconds after a lost refresh answer before the refresh token is presented again: the lost
#: request may still be in the server's hands (a read timeout fires while it processes);
#: a second presentation racing the first would look like reuse.
RETRY_QUIET_SECONDS = 60.0


def _unknown_outcome(conn_id: str) -> ReauthorizationRequired:
    return ReauthorizationRequired(
        conn_id,
        f"{MAX_UNKNOWN_REFRESH_OUTCOMES} refreshes in a row reached the server but their answers were lost, so "
        "the stored refresh token may have been replaced; it is not presented again",
        error="refresh_outcome_unknown",
    )


def plan(
    grant: StoredGrant, *, seen_generation: int, force: bool, leeway: float, now: float, renew: bool = False
) -> str:
    """What a caller does with the stored ``grant``: :data:`USE` it or :data:`REFRESH` it.

    The one refresh policy, for the api-server coordinator and the per-machine fallback
    alike (token-custody.md, "When a token is refreshed"):

    * a generation newer than the one the caller saw, not yet expired, is used: someone
      refreshed for this caller a moment ago (after a 401 too: the refused token is gone);
    * otherwise a token is refreshed once it is within ``min(leeway, lifetime / 2)`` of its
      expiry, or when ``force`` (the server refused it with a 401);
    * after a lost refresh answer the access token is used until it really expires;
    * :class:`ReauthorizationRequired` only when the token cannot be used (expired, or
      refused) and nothing can renew it;
    * ``renew`` (the keep-alive: refresh an idle grant before the server forgets it) refreshes
      a token that is still valid, but only a healthy grant: after a lost answer, a refusal,
      or without a refresh token it is an ordinary look (the rules above), never a forced
      presentation.
    """
    token = grant.token
    if grant.generation > seen_generation and not token.is_expired(now):
        return USE
    if (
        renew
        and not force
        and token.refresh_token
        and not grant.unknown_refresh_outcomes
        and grant.reauthorization_error is None
    ):
        return REFRESH
    if not force and not token.due_for_refresh(leeway, now):
        return USE
    unusable = force or token.is_expired(now)
    if grant.unknown_refresh_outcomes and not unusable:
        return USE
    if (
        grant.unknown_refresh_outcomes
        and grant.unknown_at is not None
        and now - grant.unknown_at < RETRY_QUIET_SECONDS
        and grant.reauthorization_error is None
        and grant.unknown_refresh_outcomes < MAX_UNKNOWN_REFRESH_OUTCOMES
    ):
        raise TransientOAuthError(
            f"the last token refresh of {grant.conn_id!r} lost its answer {now - grant.unknown_at:.0f} s ago; the "
            f"refresh token is presented again only {RETRY_QUIET_SECONDS:.0f} s after that (the server may still be "
            "processing the lost request): retry the task"
        )
    if grant.reauthorization_error is not None:
        if unusable:
            raise ReauthorizationRequired(
                grant.conn_id,
                grant.reauthorization_reason or "the refresh token was refused",
                error=grant.reauthorization_error,
            )
        return USE
    if grant.unknown_refresh_outcomes >= MAX_UNKNOWN_REFRESH_OUTCOMES:
        if unusable:
            raise _unknown_outcome(grant.conn_id)
        return USE
    if not token.refresh_token:
        if unusable:
            raise ReauthorizationRequired(grant.conn_id, "the access token expired and the grant has no refresh token")
        return USE
    return REFRESH


def refresh_grant(
    grant: StoredGrant,
    *,
    client: OAuthClient,
    store: VariableTokenStore,
    write: Callable[[StoredGrant], None],
    force: bool,
    clock: Callable[[], float] = time.time,
) -> tuple[StoredGrant, PapertrailError | None]:
    """Present ``grant``'s refresh token once and record what happened with ``write``.

    Returns the grant to use and, when the caller must fail, the error to raise *after*
    its serialization (a row lock's transaction) committed what ``write`` recorded.
    """
    conn_id = grant.conn_id
    assert grant.token.refresh_token
    try:
        token = client.refresh(grant.token.refresh_token, previous=grant.token)
    except InvalidGrantError as exc:
        write(replace(grant, reauthorization_error=exc.error, reauthorization_reason=exc.description or exc.error))
        return grant, ReauthorizationRequired(conn_id, exc.description, error=exc.error, status=exc.status)
    except RefreshOutcomeUnknown as exc:
        marked = replace(grant, unknown_refresh_outcomes=grant.unknown_refresh_outcomes + 1, unknown_at=clock())
        write(marked)
        if marked.unknown_refresh_outcomes >= MAX_UNKNOWN_REFRESH_OUTCOMES:
            return marked, _unknown_outcome(conn_id)
        if not force and not grant.token.is_expired(clock()):
            log.warning(
                "The refresh answer for %r was lost (%s); using the current access token until it expires, then "
                "presenting the refresh token once more.",
                conn_id,
                exc,
            )
            return marked, None
        return marked, TransientOAuthError(
            f"the answer to the token refresh of {conn_id!r} was lost ({exc}). The grant is kept: retry the task, "
            f"and a try {RETRY_QUIET_SECONDS:.0f} s or more later presents the refresh token once more (only a "
            "refusal, or a second lost answer, then asks for consent again)"
        )
    except PapertrailError as exc:
        # Nothing was spent (a connection error, a 429, invalid_client...): the grant is unchanged.
        from airflow_papertrail.health import REFRESH_FAILING

        store.record_failure(REFRESH_FAILING, getattr(exc, "error", None) or type(exc).__name__, str(exc))
        raise
    new = store.next_grant(token, grant, issued_for=grant.issued_for or client.config.binding())
    write(new)
    log.info("Refreshed the Papertrail-ai grant of %r (generation %d).", conn_id, new.generation)
    return new, None


def check_binding(grant: StoredGrant, config: OAuthClientConfig) -> None:
    """Refuse to use ``grant`` with endpoints or a client it was not issued for.

    Its refresh token (with the client secret) only ever goes to the token URL of the
    consent, its access token only to the data-API origin of the consent.
    """
    if grant.issued_for is None:  # stored before grants were bound: bound at its next refresh
        return
    current = config.binding()
    changed = [name for name in ("client_id", "token_url", "api_origin") if grant.issued_for.get(name) != current[name]]
    if changed:
        raise ReauthorizationRequired(
            grant.conn_id,
            f"the connection's {', '.join(changed)} changed since consent, so its tokens are not sent to the new "
            "endpoints or client: re-authorize the connection (run the papertrail_authorize DAG), or restore the "
            "previous values",
            error="endpoints_changed",
        )


# -- server side (api-server plugin) -----------------------------------------------------------
#: Seconds a coordinator's claim on one grant's refresh lasts (the token request, retries
#: and Retry-After waits included). Another request finding a live claim waits outside any
#: transaction; one finding an expired claim (its holder died) takes over.
LEASE_SECONDS = 300.0
#: Seconds between a waiting request's looks at the grant (each look is one short transaction).
LEASE_POLL_SECONDS = 0.2
#: Longest wait of one request for another's refresh; the worker's own timeout is longer.
LEASE_WAIT_SECONDS = COORDINATOR_TIMEOUT - 20


class RefreshInProgress(PapertrailError):
    """Another request holds the live refresh claim of this grant: look again shortly."""


def lease_seconds(config: OAuthClientConfig) -> float:
    """How long a refresh claim lasts: longer than the token request can take (every attempt's
    timeout, every backoff and every honoured Retry-After of the refresh retry policy), so a
    live holder never loses its claim while it may still send."""
    from airflow_papertrail.oauth.retry import RetryPolicy

    policy = RetryPolicy()
    attempts = policy.total + 1
    return attempts * config.timeout + policy.total * (policy.backoff_max + policy.max_retry_after) + 60


def coordinated_refresh(
    conn_id: str,
    *,
    seen_generation: int,
    force: bool,
    entries: EntryAccess,
    renew: bool = False,
    store: VariableTokenStore,
    client_factory: Callable[[], OAuthClient],
    config: OAuthClientConfig,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> StoredGrant:
    """Refresh the grant of ``conn_id`` at most once per generation, without holding a DB
    transaction across the token request (raises :class:`RefreshInProgress` while another
    request's claim is live).

    1. One short transaction under the row lock: read the grant, apply :func:`plan`; if a
       refresh is due, write a claim (``refresh_lease``: an id and an expiry, see
       :func:`lease_seconds`) and commit. An expired claim means its holder died, perhaps
       after sending: taking it over counts as a lost answer.
    2. The token request, with no DB connection, transaction or lock held.
    3. One short transaction under the row lock: store the result if the claim is still
       ours (retried; once the request was sent the claim is never released early).
    """
    key = grant_variable_key(conn_id)
    error: PapertrailError | None = None
    decision = USE
    took_over = False
    with entries.locked(key) as entry:
        if entry.raw is None:
            raise ReauthorizationRequired(conn_id, "no grant is stored for this connection")
        grant = store.decode(entry.raw)
        check_binding(grant, config)
        now = clock()
        lease = grant.refresh_lease
        if lease is not None and float(lease.get("until", 0)) <= now:
            log.warning("Taking over the expired refresh claim on the grant of %r: counted as a lost answer.", conn_id)
            grant = replace(
                grant,
                refresh_lease=None,
                unknown_refresh_outcomes=grant.unknown_refresh_outcomes + 1,
                unknown_at=None,  # the claim outlived any request its holder can have sent: no quiet period
            )
            entry.write(store.encode(grant))
            lease = None
            took_over = True
        try:
            decision = plan(
                grant, seen_generation=seen_generation, force=force, leeway=config.leeway, now=now, renew=renew
            )
        except PapertrailError as exc:  # leave the block normally: what was written above commits
            error = exc
        if error is None and decision == REFRESH:
            if lease is not None:
                raise RefreshInProgress(f"another request is refreshing the grant of {conn_id!r}")
            claim = secrets.token_hex(16)
            grant = replace(grant, refresh_lease={"id": claim, "until": now + lease_seconds(config)})
            entry.write(store.encode(grant))
    if took_over:
        store.record_health(replace(grant, refresh_lease=None))  # after the commit, outside the lock
    if error is not None:
        raise error
    if decision == USE:
        return grant

    sent = False
    dropped = False

    def record(result: StoredGrant) -> None:
        nonlocal sent, dropped
        sent = True  # refresh_grant writes only after the token endpoint answered (or may have)
        for attempt in range(3):
            try:
                with entries.locked(key) as entry:
                    current = store.decode(entry.raw) if entry.raw is not None else None
                    if current is None or (current.refresh_lease or {}).get("id") != claim:
                        dropped = True  # our claim was taken over (counted as a lost answer there)
                        log.error(
                            "The refresh claim on the grant of %r was taken over before its answer arrived; this "
                            "refresh's result is dropped.",
                            conn_id,
                        )
                        return
                    entry.write(store.encode(replace(result, refresh_lease=None)))
                store.record_health(replace(result, refresh_lease=None))  # committed: outside the lock
                return
            except Exception:
                if attempt == 2:
                    raise  # the claim stays: a takeover after its expiry counts a lost answer
                sleep(0.5)

    try:
        result, error = refresh_grant(
            grant, client=client_factory(), store=store, write=record, force=force, clock=clock
        )
    except BaseException:
        if not sent:
            # The token endpoint refused or was never reached (connection error, 429, invalid_client):
            # nothing rotated, so release the claim at once instead of letting waiters sit out its expiry.
            with contextlib.suppress(Exception), entries.locked(key) as entry:
                current = store.decode(entry.raw) if entry.raw is not None else None
                if current is not None and (current.refresh_lease or {}).get("id") == claim:
                    entry.write(store.encode(replace(current, refresh_lease=None)))
        raise
    if dropped:
        stored = store.decode(_read(entries, key) or "")
        return stored
    if error is not None:
        raise error
    return replace(result, refresh_lease=None)


def _read(entries: EntryAccess, key: str) -> str | None:
    with entries.locked(key) as entry:
        return entry.raw


class RefreshJob:
    """One coordinator request, its ticket already opened: :meth:`attempt` until it answers."""

    def __init__(
        self,
        cipher: Any,
        conn_id: str,
        seen_generation: int,
        force: bool,
        nonce: Any,
        entries: EntryAccess,
        renew: bool = False,
    ):
        self.cipher, self.conn_id, self.seen_generation = cipher, conn_id, seen_generation
        self.force, self.nonce, self.entries, self.renew = force, nonce, entries, renew
        self._config: Any = None

    def attempt(self) -> tuple[int, dict[str, Any]] | None:
        """(HTTP status, JSON body), or None while another request's refresh claim is live. Never raises."""
        from airflow_papertrail.hooks.papertrail import mask_in_api_server
        from airflow_papertrail.token_store import OrmVariables, VariableTokenStore

        conn_id = self.conn_id
        try:
            try:
                if self._config is None:  # once per request, not once per look while waiting
                    self._config = _server_config(conn_id)
                config = self._config
            except PapertrailConfigurationError as exc:
                return _misconfigured(str(exc))
            store = VariableTokenStore(
                conn_id, cipher=self.cipher, backend=OrmVariables(), on_secret=mask_in_api_server
            )

            def client() -> OAuthClient:
                from airflow_papertrail.oauth.client import OAuthClient

                return OAuthClient(config, on_secret=mask_in_api_server)

            try:
                grant = coordinated_refresh(
                    conn_id,
                    seen_generation=self.seen_generation,
                    force=self.force,
                    entries=self.entries,
                    renew=self.renew,
                    store=store,
                    client_factory=client,
                    config=config,
                )
            except RefreshInProgress:
                return None
            answer = {
                "conn_id": conn_id,
                "nonce": self.nonce,  # binds the answer to its request (the worker checks it)
                "generation": grant.generation,
                "access_token": grant.token.access_token,
                "token_type": grant.token.token_type,
                "expires_at": grant.token.expires_at,
                "obtained_at": grant.token.obtained_at,
                "scope": grant.token.scope,
            }
            return 200, {"ticket": seal_ticket(self.cipher, RESPONSE_PURPOSE, answer)}
        except ReauthorizationRequired as exc:
            return 409, {"error": "reauthorization_required", "message": str(exc)}
        except (TransientOAuthError, PapertrailError) as exc:
            return 503, {"error": "unavailable", "message": str(exc)}
        except Exception as exc:
            log.exception("Papertrail-ai refresh coordinator failed")
            return 503, {"error": "unavailable", "message": f"unexpected {type(exc).__name__} on the api-server"}


def open_refresh_request(ticket: str, *, entries: EntryAccess) -> RefreshJob | tuple[int, dict[str, Any]]:
    """Open the request ticket once (before any waiting, so waiting never makes it stale)."""
    from airflow_papertrail.token_store import load_cipher

    try:
        cipher = load_cipher()
    except EncryptionKeyMissing as exc:  # no ticket can be opened: say so, never blame the worker's keys
        return _misconfigured(str(exc))
    except Exception as exc:
        log.exception("Papertrail-ai refresh coordinator failed")
        return 503, {"error": "unavailable", "message": f"unexpected {type(exc).__name__} on the api-server"}
    try:
        request = open_ticket(cipher, REQUEST_PURPOSE, ticket, ttl=REQUEST_TICKET_TTL)
        conn_id = str(request["conn_id"])
        seen_generation = int(request["seen_generation"])
        force = bool(request.get("force"))
        renew = bool(request.get("renew"))  # absent in a ticket from an older worker: an ordinary look
        nonce = request.get("nonce")
    except StaleTicket:
        return 401, {"error": "stale_ticket", "message": f"the refresh ticket is older than {REQUEST_TICKET_TTL} s"}
    except (TicketError, KeyError, TypeError, ValueError):
        return 401, {"error": "invalid_ticket", "message": "not a valid refresh ticket for these encryption keys"}
    return RefreshJob(cipher, conn_id, seen_generation, force, nonce, entries, renew)


def busy_answer(conn_id: str) -> tuple[int, dict[str, Any]]:
    return 503, {
        "error": "unavailable",
        "message": f"another refresh of the grant of {conn_id!r} is still running after {LEASE_WAIT_SECONDS:.0f} s "
        "(a slow token endpoint, or a coordinator that died while refreshing: its claim then expires); retry the task",
    }


def handle_refresh_request(
    ticket: str, *, entries: EntryAccess, sleep: Callable[[float], None] = time.sleep
) -> tuple[int, dict[str, Any]]:
    """The route's logic for synchronous callers: (HTTP status, JSON body). Never raises.

    The route itself (plugins/callback_app.py) runs the same steps but waits with
    ``asyncio.sleep``, so a waiting request holds no thread either.
    """
    job = open_refresh_request(ticket, entries=entries)
    if not isinstance(job, RefreshJob):
        return job
    deadline = time.monotonic() + LEASE_WAIT_SECONDS
    while True:
        answer = job.attempt()
        if answer is not None:
            return answer
        if time.monotonic() > deadline:
            return busy_answer(job.conn_id)
        sleep(LEASE_POLL_SECONDS)


def _misconfigured(message: str) -> tuple[int, dict[str, Any]]:
    """The api-server itself cannot serve refreshes (no key, a connection it cannot use)."""
    log.error("Papertrail-ai refresh coordinator is misconfigured: %s", message)
    return 503, {"error": SERVER_MISCONFIGURED, "message": message}


def _server_config(conn_id: str) -> Any:
    """The connection as the api-server sees it, validated; PapertrailConfigurationError if it cannot be used."""
    from airflow.models.connection import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    from airflow_papertrail.hooks.papertrail import config_from_connection, mask_in_api_server

    try:
        conn = Connection.get_connection_from_secrets(conn_id)
    except AirflowNotFoundException:
        raise PapertrailConfigurationError(
            f"connection {conn_id!r} is not defined on the api-server; define it there too (a connection "
            f"that only the workers see, e.g. an AIRFLOW_CONN_{conn_id.upper()} environment variable set on "
            "the workers alone, is unknown to the api-server)"
        ) from None
    mask_in_api_server(conn.password)
    return config_from_connection(conn).validate(need_redirect_uri=False, conn_id=conn_id)


# -- worker side ---------------------------------------------------------------------------------
def coordinator_url() -> str | None:
    """``[papertrail] coordinator_url``, else derived from ``[core] execution_api_server_url``."""
    from airflow.sdk import conf

    explicit = conf.get(CONFIG_SECTION, "coordinator_url", fallback=None)
    if explicit:
        return str(explicit)
    return api_server_url(COORDINATOR_PATH)


def api_server_url(path: str) -> str | None:
    """``path`` on the api-server this worker talks to, from ``[core] execution_api_server_url``
    (``http://host:8080/execution/`` + ``/papertrail/token`` -> ``http://host:8080/papertrail/token``)."""
    from airflow.sdk import conf

    execution = conf.get("core", "execution_api_server_url", fallback=None)
    if not execution:
        return None
    parts = urlsplit(str(execution))
    base = parts.path.rstrip("/")
    if base.endswith("/execution"):
        base = base[: -len("/execution")]
    return urlunsplit((parts.scheme, parts.netloc, base + path, "", ""))


def get_valid_token(
    hook: PapertrailHook, *, force_refresh: bool = False, refused_generation: int | None = None, renew: bool = False
) -> Token:
    """A valid access token for ``hook``'s connection (see the module docstring).

    :param force_refresh: the server refused the token (a 401).
    :param refused_generation: the generation of the refused token. With it, a grant that
        someone else refreshed since is used as it is, never refreshed again.
    :param renew: refresh a still valid token of a healthy grant (the keep-alive); see :func:`plan`.
    """
    from airflow.sdk import conf

    conn_id = hook.papertrail_conn_id
    stored = hook.token_store.load()
    if stored is None:
        raise ReauthorizationRequired(conn_id, "no grant is stored for this connection")
    try:
        check_binding(stored, hook.config)  # before any token goes anywhere (data API or refresh)
    except ReauthorizationRequired as exc:
        from airflow_papertrail.health import REAUTHORIZATION_REQUIRED

        hook.token_store.record_failure(REAUTHORIZATION_REQUIRED, exc.error, exc.description)
        raise
    seen = stored.generation if refused_generation is None or not force_refresh else refused_generation
    decision = plan(
        stored, seen_generation=seen, force=force_refresh, leeway=hook.config.leeway, now=time.time(), renew=renew
    )
    if decision == USE:
        hook.issued_generation = stored.generation
        return stored.token
    if seen != stored.generation:
        stored = replace(stored, generation=seen)  # what the caller saw: the coordinator compares with it
    mode = str(conf.get(CONFIG_SECTION, "refresh_coordinator", fallback="auto") or "auto").lower()
    if mode not in ("auto", "api-server", "local"):
        raise PapertrailConfigurationError(
            f"[papertrail] refresh_coordinator must be auto, api-server or local, not {mode!r}"
        )
    if mode != "local":
        try:
            return _via_api_server(hook, stored, force_refresh, renew=renew)
        except CoordinatorUnavailable as exc:
            if mode == "api-server":
                raise TransientOAuthError(
                    f"the token refresh coordinator is unavailable: {exc}. [papertrail] refresh_coordinator = "
                    "api-server forbids refreshing on this machine: make the api-server reachable from this worker "
                    "([papertrail] coordinator_url, else [core] execution_api_server_url) with "
                    "airflow-provider-papertrail installed there, or (only if every task runs on this one machine) "
                    "set refresh_coordinator = local"
                ) from None
            why = local_fallback_refusal(str(conf.get("core", "executor", fallback="") or ""), coordinator_url())
            if why is not None:
                # Tasks may run on several machines: the per-machine lock would serialize this one only,
                # and a refresh here could present the refresh token another machine is presenting (a
                # rotating server then revokes the grant).
                message = (
                    f"the token refresh coordinator is unavailable: {exc}. refresh_coordinator = auto does not "
                    f"refresh on this machine because {why} (a refresh here would not be serialized with the "
                    "others): make the api-server reachable from this worker ([papertrail] coordinator_url, else "
                    "[core] execution_api_server_url) with airflow-provider-papertrail installed there"
                )
                if exc.refused:
                    raise TransientOAuthError(
                        message + ", then retry the task. Only if every task of this deployment runs on this one "
                        "machine (e.g. dag.test() without an api-server), set refresh_coordinator = local"
                    ) from None
                raise PapertrailConfigurationError(
                    message + ". Only if every task of this deployment runs on this one machine (e.g. dag.test() "
                    "without an api-server), set refresh_coordinator = local"
                ) from None
            log.info("No Papertrail-ai refresh coordinator reachable (%s); refreshing on this machine.", exc)
    return _locally(hook, stored, force_refresh, renew=renew)


#: Executors whose tasks all run on the machine of the scheduler that started them, where the
#: per-machine lock serializes every refresh: ``auto`` may fall back to it under these only.
#: (SequentialExecutor and DebugExecutor are Airflow 2 names, kept for configurations carried over.)
SINGLE_MACHINE_EXECUTORS = frozenset({"LocalExecutor", "SequentialExecutor", "DebugExecutor"})


def remote_executors(setting: str) -> list[str]:
    """The executors named in ``[core] executor`` that may run tasks on other machines: all but
    :data:`SINGLE_MACHINE_EXECUTORS`. Airflow 3.3's format: ``global_list;team=list``, each list
    comma-separated names, module paths or ``alias:path`` entries (a leading ``=`` names the
    global list). Empty (no executor configured) means this machine only."""
    found: list[str] = []
    for part in setting.split(";"):
        executors = part.split("=", 1)[-1]  # "team1=CeleryExecutor" -> "CeleryExecutor"
        for entry in executors.split(","):
            name = entry.strip().rsplit(":", 1)[-1].rsplit(".", 1)[-1].strip()
            if name and name not in SINGLE_MACHINE_EXECUTORS and name not in found:
                found.append(name)
    return found


def _loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def local_fallback_refusal(executor_setting: str, url: str | None) -> str | None:
    """Why ``refresh_coordinator = auto`` must not refresh on this machine when no coordinator
    answered (its tasks may run on several machines), or None when it may (one machine: dag.test(),
    a laptop, LocalExecutor with the api-server beside it).

    Three signs of several machines, each enough: an executor that runs tasks elsewhere in
    ``[core] executor``; a KubernetesExecutor pod (Airflow sets ``AIRFLOW_IS_K8S_EXECUTOR_POD``;
    the official chart's pod template says ``LocalExecutor``, so the setting alone would miss it);
    a coordinator URL on another host (the api-server is a machine of its own)."""
    remote = remote_executors(executor_setting)
    if remote:
        return f"[core] executor = {', '.join(remote)} may run tasks on several machines"
    if os.environ.get("AIRFLOW_IS_K8S_EXECUTOR_POD"):  # as Airflow reads it: any value
        return "this task runs in a KubernetesExecutor pod (AIRFLOW_IS_K8S_EXECUTOR_POD), one machine of many"
    host = urlsplit(url).hostname if url else None
    if host and not _loopback(host):
        return f"the coordinator URL is on another machine ({host}), so this deployment has more than one"
    return None


def _via_api_server(hook: PapertrailHook, stored: StoredGrant, force: bool, *, renew: bool = False) -> Token:
    import requests

    from airflow_papertrail.hooks.papertrail import mask

    conn_id = hook.papertrail_conn_id
    url = coordinator_url()
    if not url:
        raise CoordinatorUnavailable("neither [papertrail] coordinator_url nor [core] execution_api_server_url is set")
    cipher = hook.token_store.cipher
    nonce = secrets.token_urlsafe(16)
    ticket = seal_ticket(
        cipher,
        REQUEST_PURPOSE,
        {"conn_id": conn_id, "seen_generation": stored.generation, "force": force, "renew": renew, "nonce": nonce},
    )
    try:
        response = requests.post(url, json={"ticket": ticket}, timeout=(5, COORDINATOR_TIMEOUT), allow_redirects=False)
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        if _refused(exc):
            raise CoordinatorUnavailable(f"{url} refused the connection ({type(exc).__name__})", refused=True) from None
        raise TransientOAuthError(
            f"the api-server's refresh coordinator did not answer ({type(exc).__name__}); the refresh, if it "
            "started, completes there and is stored: retry the task"
        ) from None
    body = _json_object(response)
    if body is not None and NO_ROUTE_ANSWERS.get(response.status_code) == body:
        raise CoordinatorUnavailable(f"{url} has no Papertrail-ai refresh route (HTTP {response.status_code})")
    if body is None or not ({"ticket", "error"} & body.keys()):
        # A proxy's error page (502/504 while the api-server may be presenting the refresh token
        # right now), a plain-text 500, the UI: never a reason to refresh here beside it.
        content_type = response.headers.get("content-type", "no content type").split(";")[0]
        raise TransientOAuthError(
            f"the refresh coordinator at {url} answered HTTP {response.status_code} ({content_type}) without a "
            "Papertrail-ai answer, e.g. a proxy's error page or timeout. Nothing was refreshed on this machine (the "
            "api-server may be refreshing right now): retry the task; if it persists, check the proxy and the "
            "api-server log, or point [papertrail] coordinator_url at the api-server"
        )
    if body.get("error") == SERVER_MISCONFIGURED:
        raise PapertrailConfigurationError(
            "the api-server cannot refresh Papertrail-ai tokens because of its own configuration: "
            f"{str(body.get('message', '')).rstrip('. ')}. Fix this on the api-server (its [papertrail] "
            f"token_encryption_keys, or the connection {conn_id!r} as the api-server reads it: run 'airflow "
            f"connections get {conn_id}' there), restart it if you changed its environment, then retry the task"
        )
    if response.status_code == 409:
        raise ReauthorizationRequired(conn_id, str(body.get("message", "")))
    if response.status_code == 401 and body.get("error") == "stale_ticket":
        raise TransientOAuthError(
            f"the api-server received our refresh ticket more than {REQUEST_TICKET_TTL} s after it was made (a slow "
            "network or proxy, or the clocks of this worker and the api-server differ); retry the task"
        )
    if response.status_code == 401:
        raise PapertrailConfigurationError(
            "the api-server refused our refresh ticket: [papertrail] token_encryption_keys differ between this "
            "worker and the api-server; set the same keys on every Airflow component"
        )
    if response.status_code != 200:
        raise TransientOAuthError(
            f"token refresh failed on the api-server: {body.get('message', response.status_code)}; "
            "the api-server log has the details; retry the task once the cause is fixed"
        )
    try:
        answer = open_ticket(cipher, RESPONSE_PURPOSE, str(body["ticket"]), ttl=RESPONSE_TICKET_TTL)
    except StaleTicket:
        raise TransientOAuthError(
            f"the api-server's refresh answer is older than {RESPONSE_TICKET_TTL} s (the refresh or the network was "
            "slow, or the clocks of this worker and the api-server differ); retry the task: the refreshed grant is "
            "stored"
        ) from None
    except (TicketError, KeyError):
        raise PapertrailConfigurationError(
            "the api-server's refresh answer cannot be read with this worker's [papertrail] token_encryption_keys "
            "(the api-server encrypts with a key this worker lacks, e.g. half-way through a key rotation); set the "
            "same keys, in the same order, on every Airflow component"
        ) from None
    if answer.get("nonce") != nonce or answer.get("conn_id") != conn_id:
        raise TransientOAuthError(
            f"the refresh coordinator's answer does not answer this request (another request's or another "
            f"connection's answer) and was refused; retry the task. If it persists, something between this worker "
            f"and {url} replays answers"
        )
    mask(answer["access_token"])
    # Read back: the new grant must be what the store holds now (or something newer).
    current = hook.token_store.load()
    if current is None or current.generation < int(answer["generation"]):
        raise TransientOAuthError(
            f"the refreshed grant of {conn_id!r} (generation {answer['generation']}) is not visible in its Variable "
            f"yet; retry the task (if this persists, a secrets backend may shadow the Variable "
            f"{grant_variable_key(conn_id)!r})"
        )
    hook.issued_generation = int(answer["generation"])
    return Token(
        access_token=str(answer["access_token"]),
        token_type=str(answer.get("token_type") or "Bearer"),
        obtained_at=float(answer["obtained_at"]),
        expires_at=float(answer["expires_at"]),
        scope=answer.get("scope"),
    )


def _refused(exc: BaseException) -> bool:
    """Whether the coordinator's host actively refused the connection (nothing listens there).

    Only that, or Starlette's own "no such route", lets ``auto`` refresh on this machine: a DNS
    failure or a connect timeout says nothing about whether an api-server is refreshing.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConnectionRefusedError):
            return True
        reason = getattr(cur, "reason", None)
        nxt = reason if isinstance(reason, BaseException) else None
        nxt = nxt or next((a for a in getattr(cur, "args", ()) if isinstance(a, BaseException)), None)
        cur = nxt or cur.__cause__ or cur.__context__
    return False


def _json_object(response: Any) -> dict[str, Any] | None:
    """The answer's JSON object, or None for anything else (HTML, text, a JSON list, bad JSON)."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _machine_lock(conn_id: str) -> Iterator[None]:
    """One refresh per connection on this machine: threads, then processes (flock)."""
    import fcntl

    with _THREAD_LOCKS_GUARD:
        lock = _THREAD_LOCKS.setdefault(conn_id, threading.Lock())
    # Named from a hash: a conn_id may hold "/" or anything else a file name cannot.
    digest = hashlib.sha256(conn_id.encode("utf-8")).hexdigest()[:32]
    path = os.path.join(tempfile.gettempdir(), f"airflow-papertrail-refresh-{digest}.lock")
    with lock, open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _locally(hook: PapertrailHook, seen: StoredGrant, force: bool, *, renew: bool = False) -> Token:
    conn_id = hook.papertrail_conn_id
    with _machine_lock(conn_id):
        stored = hook.token_store.load()
        if stored is None:
            raise ReauthorizationRequired(conn_id, "no grant is stored for this connection")
        check_binding(stored, hook.config)
        now = time.time()
        decision = plan(
            stored, seen_generation=seen.generation, force=force, leeway=hook.config.leeway, now=now, renew=renew
        )
        if decision == USE:
            hook.issued_generation = stored.generation
            return stored.token
        if stored.refresh_lease is not None and float(stored.refresh_lease.get("until", 0)) > now:
            raise TransientOAuthError(
                f"the api-server is refreshing the grant of {conn_id!r} right now; retry the task (mixing "
                "refresh_coordinator = local with api-server refreshes of one grant is not supported)"
            )
        grant, error = refresh_grant(
            stored, client=hook.oauth_client, store=hook.token_store, write=hook.token_store.write, force=force
        )
    if error is not None:
        raise error
    hook.issued_generation = grant.generation
    return grant.token
