"""Valid access tokens for every task: proactive refresh, serialized across processes and machines.

Why this shape (Airflow 3 tasks have no DB access, no lock and no compare-and-set on
Variables): the one place that can hold a lock over the grant is the api-server, which
owns the metadata DB. So a worker that needs a refresh asks the api-server's plugin
(``POST /papertrail/token``); the plugin locks the grant's Variable row, re-reads it, and
only if it is still the generation the worker saw (and still expiring) presents the
refresh token, stores the new grant in the same transaction and answers with the new
access token. 32 tasks that see the same expired token cause exactly one refresh; the
other 31 wait on the row lock and get the stored result.

The request and the answer are Fernet tickets made with ``[papertrail]
token_encryption_keys`` (60 s/300 s lifetime): only our own components can ask, and the
access token never crosses the network in the clear. Workers without a reachable
api-server plugin (``dag.test()``, a laptop) fall back to a single flight per machine
(a thread lock plus an ``flock`` on a file); ``[papertrail] refresh_coordinator`` forces
either path.

A refresh whose response was lost (timeout, connection reset, 502/504) may already have
rotated the token at the server. It is never replayed: the grant is marked
``refresh_outcome_unknown`` and every later use asks for re-authorization instead of
presenting a token that could revoke the whole grant.
"""

from __future__ import annotations

import contextlib
import logging
import os
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
from airflow_papertrail.oauth.envelope import TicketError, open_ticket, seal_ticket
from airflow_papertrail.oauth.tokens import Token
from airflow_papertrail.token_store import CONFIG_SECTION, grant_variable_key

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from airflow_papertrail.hooks.papertrail import PapertrailHook
    from airflow_papertrail.oauth.client import OAuthClient
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


class CoordinatorUnavailable(PapertrailError):
    """No api-server plugin answered (nothing was sent, or the route does not exist)."""


def _unknown_outcome(conn_id: str) -> ReauthorizationRequired:
    return ReauthorizationRequired(
        conn_id,
        "an earlier refresh reached the server but its answer was lost, so the stored refresh token "
        "may already have been replaced; it is not presented again (that can revoke the whole grant)",
        error="refresh_outcome_unknown",
    )


# -- server side (api-server plugin) -----------------------------------------------------------
def coordinated_refresh(
    conn_id: str,
    *,
    seen_generation: int,
    force: bool,
    entries: EntryAccess,
    store: VariableTokenStore,
    client_factory: Callable[[], OAuthClient],
    leeway: float,
    clock: Callable[[], float] = time.time,
) -> StoredGrant:
    """Refresh the grant of ``conn_id`` at most once per generation, under the row lock."""
    unknown = False
    with entries.locked(grant_variable_key(conn_id)) as entry:
        if entry.raw is None:
            raise ReauthorizationRequired(conn_id, "no grant is stored for this connection")
        grant = store.decode(entry.raw)
        expiring = grant.token.expires_within(leeway, clock())
        if grant.generation > seen_generation and not expiring:
            return grant  # someone refreshed while this caller waited for the lock
        if not force and not expiring:
            return grant
        if grant.refresh_outcome_unknown:
            raise _unknown_outcome(conn_id)
        if not grant.token.refresh_token:
            raise ReauthorizationRequired(conn_id, "the access token expired and the grant has no refresh token")
        try:
            token = client_factory().refresh(grant.token.refresh_token, previous=grant.token)
        except InvalidGrantError as exc:
            raise ReauthorizationRequired(conn_id, exc.description, error=exc.error, status=exc.status) from None
        except RefreshOutcomeUnknown:
            entry.write(store.encode(replace(grant, refresh_outcome_unknown=True)))
            unknown = True  # commit the marker: leave the block normally, raise after
        else:
            new = store.next_grant(token, grant)
            entry.write(store.encode(new))
            log.info("Refreshed the Papertrail-ai grant of %r (generation %d).", conn_id, new.generation)
            return new
    assert unknown
    raise _unknown_outcome(conn_id)


def handle_refresh_request(ticket: str, *, entries: EntryAccess) -> tuple[int, dict[str, Any]]:
    """The plugin route's logic: (HTTP status, JSON body). Never raises."""
    from airflow_papertrail.hooks.papertrail import mask_in_api_server
    from airflow_papertrail.token_store import OrmVariables, VariableTokenStore, load_cipher

    try:
        try:
            cipher = load_cipher()
        except EncryptionKeyMissing as exc:  # no ticket can be opened: say so, never blame the worker's keys
            return _misconfigured(str(exc))
        try:
            request = open_ticket(cipher, REQUEST_PURPOSE, ticket, ttl=60)
            conn_id = str(request["conn_id"])
            seen_generation = int(request["seen_generation"])
            force = bool(request.get("force"))
        except (TicketError, KeyError, TypeError, ValueError):
            return 401, {"error": "invalid_ticket", "message": "not a valid refresh ticket for these encryption keys"}
        try:
            config = _server_config(conn_id)
        except PapertrailConfigurationError as exc:
            return _misconfigured(str(exc))
        store = VariableTokenStore(conn_id, cipher=cipher, backend=OrmVariables(), on_secret=mask_in_api_server)

        def client() -> OAuthClient:
            from airflow_papertrail.oauth.client import OAuthClient

            return OAuthClient(config, on_secret=mask_in_api_server)

        grant = coordinated_refresh(
            conn_id,
            seen_generation=seen_generation,
            force=force,
            entries=entries,
            store=store,
            client_factory=client,
            leeway=config.leeway,
        )
        answer = {
            "conn_id": conn_id,
            "generation": grant.generation,
            "access_token": grant.token.access_token,
            "token_type": grant.token.token_type,
            "expires_at": grant.token.expires_at,
            "obtained_at": grant.token.obtained_at,
            "scope": grant.token.scope,
        }
        return 200, {"ticket": seal_ticket(cipher, RESPONSE_PURPOSE, answer)}
    except ReauthorizationRequired as exc:
        return 409, {"error": "reauthorization_required", "message": str(exc)}
    except (TransientOAuthError, PapertrailError) as exc:
        return 503, {"error": "unavailable", "message": str(exc)}
    except Exception as exc:
        log.exception("Papertrail-ai refresh coordinator failed")
        return 503, {"error": "unavailable", "message": f"unexpected {type(exc).__name__} on the api-server"}


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


def get_valid_token(hook: PapertrailHook, *, force_refresh: bool = False) -> Token:
    """A valid access token for ``hook``'s connection (see the module docstring)."""
    from airflow.sdk import conf

    conn_id = hook.papertrail_conn_id
    stored = hook.token_store.load()
    if stored is None:
        raise ReauthorizationRequired(conn_id, "no grant is stored for this connection")
    if stored.refresh_outcome_unknown:
        raise _unknown_outcome(conn_id)
    if not force_refresh and not stored.token.expires_within(hook.config.leeway, time.time()):
        return stored.token
    mode = str(conf.get(CONFIG_SECTION, "refresh_coordinator", fallback="auto") or "auto").lower()
    if mode not in ("auto", "api-server", "local"):
        raise PapertrailConfigurationError(
            f"[papertrail] refresh_coordinator must be auto, api-server or local, not {mode!r}"
        )
    if mode != "local":
        try:
            return _via_api_server(hook, stored, force_refresh)
        except CoordinatorUnavailable as exc:
            if mode == "api-server":
                raise TransientOAuthError(
                    f"the token refresh coordinator is unavailable: {exc}. [papertrail] refresh_coordinator = "
                    "api-server forbids refreshing on this machine: make the api-server reachable from this worker "
                    "([papertrail] coordinator_url, else [core] execution_api_server_url) with "
                    "airflow-provider-papertrail installed there, or set refresh_coordinator = auto"
                ) from None
            log.info("No Papertrail-ai refresh coordinator reachable (%s); refreshing on this machine.", exc)
    return _locally(hook, stored, force_refresh)


def _via_api_server(hook: PapertrailHook, stored: StoredGrant, force: bool) -> Token:
    import requests

    from airflow_papertrail.hooks.papertrail import mask

    conn_id = hook.papertrail_conn_id
    url = coordinator_url()
    if not url:
        raise CoordinatorUnavailable("neither [papertrail] coordinator_url nor [core] execution_api_server_url is set")
    cipher = hook.token_store.cipher
    ticket = seal_ticket(
        cipher, REQUEST_PURPOSE, {"conn_id": conn_id, "seen_generation": stored.generation, "force": force}
    )
    try:
        response = requests.post(url, json={"ticket": ticket}, timeout=(5, COORDINATOR_TIMEOUT), allow_redirects=False)
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        from airflow_papertrail.oauth.client import _never_sent

        if _never_sent(exc):
            raise CoordinatorUnavailable(f"{url} not reachable ({type(exc).__name__})") from None
        raise TransientOAuthError(
            f"the api-server's refresh coordinator did not answer ({type(exc).__name__}); the refresh, if it "
            "started, completes there and is stored: retry the task"
        ) from None
    if response.status_code == 404 or not response.headers.get("content-type", "").startswith("application/json"):
        raise CoordinatorUnavailable(f"{url} has no Papertrail-ai refresh route (HTTP {response.status_code})")
    body = response.json()
    if not isinstance(body, dict):
        raise CoordinatorUnavailable(f"{url} has no Papertrail-ai refresh route (HTTP {response.status_code})")
    if body.get("error") == SERVER_MISCONFIGURED:
        raise PapertrailConfigurationError(
            "the api-server cannot refresh Papertrail-ai tokens because of its own configuration: "
            f"{str(body.get('message', '')).rstrip('. ')}. Fix this on the api-server (its [papertrail] "
            f"token_encryption_keys, or the connection {conn_id!r} as the api-server reads it: run 'airflow "
            f"connections get {conn_id}' there), restart it if you changed its environment, then retry the task"
        )
    if response.status_code == 409:
        raise ReauthorizationRequired(conn_id, str(body.get("message", "")))
    if response.status_code == 401:
        raise PapertrailConfigurationError(
            "the api-server refused our refresh ticket: [papertrail] token_encryption_keys differ between this "
            "worker and the api-server (or their clocks differ by more than a minute); set the same keys on every "
            "Airflow component"
        )
    if response.status_code != 200:
        raise TransientOAuthError(
            f"token refresh failed on the api-server: {body.get('message', response.status_code)}; "
            "the api-server log has the details; retry the task once the cause is fixed"
        )
    try:
        answer = open_ticket(cipher, RESPONSE_PURPOSE, str(body["ticket"]), ttl=300)
    except (TicketError, KeyError):
        raise PapertrailConfigurationError(
            "the api-server's refresh answer cannot be read with this worker's [papertrail] token_encryption_keys "
            "(the api-server encrypts with a key this worker lacks, e.g. half-way through a key rotation, or the "
            "clocks of this worker and the api-server differ by more than a minute); set the same keys, in the "
            "same order, on every Airflow component"
        ) from None
    mask(answer["access_token"])
    # Read back: the new grant must be what the store holds now (or something newer).
    current = hook.token_store.load()
    if current is None or current.generation < int(answer["generation"]):
        raise TransientOAuthError(
            f"the refreshed grant of {conn_id!r} (generation {answer['generation']}) is not visible in its Variable "
            f"yet; retry the task (if this persists, a secrets backend may shadow the Variable "
            f"{grant_variable_key(conn_id)!r})"
        )
    return Token(
        access_token=str(answer["access_token"]),
        token_type=str(answer.get("token_type") or "Bearer"),
        obtained_at=float(answer["obtained_at"]),
        expires_at=float(answer["expires_at"]),
        scope=answer.get("scope"),
    )


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _machine_lock(conn_id: str) -> Iterator[None]:
    """One refresh per connection on this machine: threads, then processes (flock)."""
    import fcntl

    with _THREAD_LOCKS_GUARD:
        lock = _THREAD_LOCKS.setdefault(conn_id, threading.Lock())
    path = os.path.join(tempfile.gettempdir(), f"airflow-papertrail-refresh-{conn_id}.lock")
    with lock, open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _locally(hook: PapertrailHook, seen: StoredGrant, force: bool) -> Token:
    conn_id = hook.papertrail_conn_id
    with _machine_lock(conn_id):
        stored = hook.token_store.load()
        if stored is None:
            raise ReauthorizationRequired(conn_id, "no grant is stored for this connection")
        if stored.refresh_outcome_unknown:
            raise _unknown_outcome(conn_id)
        expiring = stored.token.expires_within(hook.config.leeway, time.time())
        if (stored.generation > seen.generation or not force) and not expiring:
            return stored.token
        if not stored.token.refresh_token:
            raise ReauthorizationRequired(conn_id, "the access token expired and the grant has no refresh token")
        try:
            token = hook.oauth_client.refresh(stored.token.refresh_token, previous=stored.token)
        except InvalidGrantError as exc:
            raise ReauthorizationRequired(conn_id, exc.description, error=exc.error, status=exc.status) from None
        except RefreshOutcomeUnknown:
            hook.token_store.mark_refresh_outcome_unknown(stored)
            raise _unknown_outcome(conn_id) from None
        return hook.token_store.save(token, based_on=stored).token
