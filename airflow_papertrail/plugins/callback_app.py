"""The OAuth redirect endpoint, mounted on the api-server at ``/papertrail``.

``GET /papertrail/callback`` is reachable without an Airflow login (the browser arrives
from the authorization server), so it acts only on a state it issued itself: the state's
hash names the pending entry, the decrypted entry's state is compared in constant time,
and only a ``pending`` entry that has not expired accepts a code (once). Everything else
gets a clear page with a 4xx status and changes nothing. The query string is scrubbed
from the request scope before Airflow's access log reads it, so the code never reaches
that log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from airflow_papertrail.authorization import (
    PENDING,
    AuthorizationStore,
    authorization_id_for,
    check_state,
    pending_variable_key,
)
from airflow_papertrail.exceptions import EncryptionKeyMissing, PapertrailError, TokenKeyMismatch
from airflow_papertrail.links import connect_page_url
from airflow_papertrail.plugins.connect import ConnectServices, connect_router
from airflow_papertrail.plugins.connect_start import ORIGIN_CONNECT
from airflow_papertrail.plugins.locking import EntryAccess, OrmEntryAccess
from airflow_papertrail.plugins.pages import SECURITY_HEADERS, render

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_QUERY_BYTES = 4096
MAX_FIELDS = 16
_STATE = re.compile(r"[A-Za-z0-9_-]{20,128}")
_CODE = re.compile(r"[\x21-\x7e]{1,2048}")  # RFC 6749 VSCHAR
_ERROR = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]{1,128}")  # RFC 6749 4.1.2.1
_SINGLE = ("state", "code", "error", "error_description", "error_uri", "iss")
REDACTED_QUERY = b"papertrail-callback-query=redacted"


class CallbackError(Exception):
    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


def _parse(query: bytes) -> dict[str, str]:
    if len(query) > MAX_QUERY_BYTES:
        raise CallbackError(400, "Request too large", "The callback parameters are too large; nothing was recorded.")
    try:
        pairs = parse_qsl(
            query.decode("ascii"), keep_blank_values=True, max_num_fields=MAX_FIELDS, strict_parsing=False
        )
    except (UnicodeDecodeError, ValueError):
        raise CallbackError(
            400, "Malformed request", "The callback parameters are malformed; nothing was recorded."
        ) from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in _SINGLE and key in params:
            raise CallbackError(400, "Malformed request", f"The parameter '{key}' appears twice; nothing was recorded.")
        params.setdefault(key, value)
    return params


def _resolve(params: dict[str, str]) -> tuple[str, str]:
    state = params.get("state", "")
    if not state:
        raise CallbackError(
            400,
            "Missing state",
            "This callback has no state parameter, so it cannot belong to an authorization "
            "started by Airflow. Nothing was recorded.",
        )
    if not _STATE.fullmatch(state):
        raise CallbackError(
            400,
            "Unknown authorization",
            "This link does not belong to a pending authorization. Nothing was recorded; "
            "if you are connecting an organisation, start a new authorization from Airflow.",
        )
    code, error = params.get("code"), params.get("error")
    if code and error:
        raise CallbackError(
            400, "Malformed request", "The callback carries both a code and an error; nothing was recorded."
        )
    if not code and not error:
        raise CallbackError(
            400, "Malformed request", "The callback carries neither a code nor an error; nothing was recorded."
        )
    if code is not None and not _CODE.fullmatch(code):
        raise CallbackError(400, "Malformed request", "The authorization code is malformed; nothing was recorded.")
    if error is not None and not _ERROR.fullmatch(error):
        raise CallbackError(400, "Malformed request", "The error parameter is malformed; nothing was recorded.")
    return state, authorization_id_for(state)


def handle_callback(
    query: bytes,
    *,
    entries: EntryAccess,
    store: AuthorizationStore,
    clock: Callable[[], float] = time.time,
) -> tuple[int, str, str, bool]:
    """Process one callback. Returns (HTTP status, title, message, ok); never raises."""
    status, title, message, ok, _ = handle_callback_page(query, entries=entries, store=store, clock=clock)
    return status, title, message, ok


def handle_callback_page(
    query: bytes,
    *,
    entries: EntryAccess,
    store: AuthorizationStore,
    clock: Callable[[], float] = time.time,
) -> tuple[int, str, str, bool, str | None]:
    """:func:`handle_callback` plus the Connect page link to offer (None: none).

    The link is offered only for an entry the state proved genuine and that the Connect page
    issued: it is a plain link to the page (configured, carries nothing of the callback),
    never an automatic redirect.
    """
    back: list[str] = []
    status, title, message, ok = _handle(query, entries=entries, store=store, clock=clock, back=back)
    return status, title, message, ok, (back[0] if back else None)


def _handle(
    query: bytes,
    *,
    entries: EntryAccess,
    store: AuthorizationStore,
    clock: Callable[[], float],
    back: list[str],
) -> tuple[int, str, str, bool]:
    try:
        params = _parse(query)
        state, authorization_id = _resolve(params)
        with entries.locked(pending_variable_key(authorization_id)) as entry:
            if entry.raw is None:
                raise CallbackError(
                    400,
                    "Unknown authorization",
                    "This link does not belong to a pending authorization (it may "
                    "already have been used). Nothing was recorded; start a new authorization from Airflow.",
                )
            pending = store.decode(authorization_id, entry.raw)
            if not check_state(pending, state):
                raise CallbackError(
                    400,
                    "Unknown authorization",
                    "This link does not belong to a pending authorization. Nothing was recorded; "
                    "if you are connecting an organisation, start a new authorization from Airflow.",
                )
            if pending.origin == ORIGIN_CONNECT:
                back.append(connect_page_url(pending.conn_id))
            if pending.status != PENDING:
                raise CallbackError(
                    409,
                    "Already used",
                    "This authorization has already received its answer; a second one is "
                    "refused. If you need to connect again, start a new authorization from Airflow.",
                )
            now = clock()
            if pending.is_expired(now):
                raise CallbackError(
                    410,
                    "Authorization expired",
                    "This authorization link has expired. Nothing was recorded; "
                    "re-run the papertrail_authorize DAG in Airflow to get a new link.",
                )
            iss = params.get("iss")
            if pending.expected_issuer and iss is None:
                # RFC 9207 2.4: a client that expects an issuer refuses an answer without one.
                raise CallbackError(
                    400,
                    "Missing issuer",
                    "This answer does not say which authorization server sent it (no iss parameter, RFC "
                    "9207), but the connection expects one. Nothing was recorded.",
                )
            if iss is not None and pending.expected_issuer and iss != pending.expected_issuer:
                raise CallbackError(
                    400,
                    "Wrong issuer",
                    "This answer comes from an unexpected authorization server (iss mismatch, "
                    "RFC 9207). Nothing was recorded.",
                )
            error = params.get("error")
            if error:
                entry.write(store.encode(pending.with_error(error, params.get("error_description"), now)))
                log.info(
                    "Papertrail-ai authorization %s for connection %r was answered with an error.",
                    authorization_id[:12],
                    pending.conn_id,
                )
                denied = error == "access_denied"
                return (
                    200,
                    "Access not granted" if denied else "Authorization failed",
                    "Access was not granted, and Airflow has been told. You can close this tab."
                    if denied
                    else "The authorization server reported an error; Airflow has been told. You can close this tab.",
                    False,
                )
            # Masked only now that the state proved the callback genuine: an unauthenticated
            # caller must not be able to fill the masker with values of its choosing.
            store.protect(params["code"])
            entry.write(store.encode(pending.with_code(params["code"], now)))
            log.info(
                "Papertrail-ai authorization %s for connection %r captured its code.",
                authorization_id[:12],
                pending.conn_id,
            )
            return (
                200,
                "Authorization received",
                f"Airflow received the authorization for connection '{pending.conn_id}' and is completing it. "
                "You can close this tab.",
                True,
            )
    except CallbackError as exc:
        return exc.status, exc.title, exc.message, False
    except (EncryptionKeyMissing, TokenKeyMismatch) as exc:
        # The entry was found by the state's hash, so it is ours: if it cannot be opened, the
        # api-server's keys are missing or differ from the worker's. "Start a new authorization"
        # would fail the same way every time; say what is wrong instead.
        log.error("Papertrail-ai callback: the api-server is misconfigured: %s", exc)
        return (
            503,
            "Airflow is not configured for this",
            "Airflow's api-server cannot open this authorization: its Papertrail-ai encryption keys are "
            "not configured, or differ from the other Airflow components' ([papertrail] token_encryption_keys). "
            "Nothing was recorded. Tell your Airflow administrator; the api-server log has the details.",
            False,
        )
    except PapertrailError as exc:
        log.warning("Papertrail-ai callback refused: %s", exc)
        return (
            400,
            "Unknown authorization",
            "This link does not belong to a pending authorization. Nothing was recorded; "
            "if you are connecting an organisation, start a new authorization from Airflow.",
            False,
        )
    except Exception:
        log.exception("Papertrail-ai callback could not be processed")
        return (
            503,
            "Temporarily unavailable",
            "Airflow could not record this answer right now; nothing was recorded. Try the link again shortly.",
            False,
        )


def create_app(
    *,
    entries: EntryAccess | None = None,
    store: AuthorizationStore | None = None,
    connect_services: ConnectServices | None = None,
) -> FastAPI:
    """The FastAPI sub-application; nothing touches the DB or config until a request arrives.

    Routes: the OAuth callback, the refresh coordinator (``/token``) and the Connect page
    (:mod:`airflow_papertrail.plugins.connect`).
    """
    # redirect_slashes=False: Starlette would answer /callback/?code=... with a redirect whose
    # Location (and access-log line) carries the code, before any route could scrub it.
    app = FastAPI(
        title="Papertrail-ai OAuth callback", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False
    )
    router = APIRouter()
    state: dict[str, object] = {}

    def deps() -> tuple[EntryAccess, AuthorizationStore]:
        if "entries" not in state:
            from airflow_papertrail.hooks.papertrail import mask_in_api_server
            from airflow_papertrail.token_store import OrmVariables

            state["entries"] = entries or OrmEntryAccess()
            state["store"] = store or AuthorizationStore(backend=OrmVariables(), on_secret=mask_in_api_server)
        return state["entries"], state["store"]  # type: ignore[return-value]

    @router.get("/callback", response_class=HTMLResponse)
    def callback(request: Request) -> HTMLResponse:
        # Sync route: DB calls block. Scrub first, so the access log never sees the code.
        query = request.scope.get("query_string", b"")
        request.scope["query_string"] = REDACTED_QUERY if query else b""
        entry_access, auth_store = deps()
        status, title, message, ok, back = handle_callback_page(query, entries=entry_access, store=auth_store)
        link = (back, "Back to Papertrail-ai connections") if back else None
        return HTMLResponse(render(title, message, ok=ok, link=link), status_code=status, headers=SECURITY_HEADERS)

    @router.post("/token", include_in_schema=False)
    async def token(request: Request) -> JSONResponse:
        """Refresh coordinator for our own workers (authenticated by a Fernet ticket, see refresh.py).

        The body is read up to MAX_TOKEN_BODY_BYTES before anything parses it; the blocking
        work (DB, token endpoint) runs on a worker thread.
        """
        from starlette.concurrency import run_in_threadpool

        from airflow_papertrail.refresh import (
            LEASE_POLL_SECONDS,
            LEASE_WAIT_SECONDS,
            RefreshJob,
            busy_answer,
            open_refresh_request,
        )

        raw = await _read_limited(request, MAX_TOKEN_BODY_BYTES)
        if raw is None:
            return _token_answer(413, {"error": "invalid_request", "message": "body too large"})
        try:
            request_body = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
            return _token_answer(400, {"error": "invalid_request", "message": "the body is not JSON"})
        ticket = request_body.get("ticket") if isinstance(request_body, dict) else None
        if not isinstance(ticket, str) or len(ticket) > MAX_TICKET_CHARS:
            return _token_answer(401, {"error": "invalid_ticket"})
        entry_access, _ = deps()
        job = await run_in_threadpool(open_refresh_request, ticket, entries=entry_access)
        if not isinstance(job, RefreshJob):
            return _token_answer(*job)
        # While another request refreshes this grant, wait here with asyncio.sleep: a waiter
        # holds no DB connection, no transaction and no thread (each look is one short one).
        deadline = time.monotonic() + LEASE_WAIT_SECONDS
        while True:
            answer = await run_in_threadpool(job.attempt)
            if answer is not None:
                return _token_answer(*answer)
            if time.monotonic() > deadline:
                return _token_answer(*busy_answer(job.conn_id))
            await asyncio.sleep(LEASE_POLL_SECONDS)

    @router.get("/callback/", include_in_schema=False)
    def callback_with_slash(request: Request) -> HTMLResponse:
        """Never redirect (the Location would carry the code): refuse, scrubbed, like any unknown path."""
        request.scope["query_string"] = REDACTED_QUERY if request.scope.get("query_string") else b""
        return HTMLResponse(
            render(
                "Wrong address",
                "This address ends with a slash; the Papertrail-ai callback is /papertrail/callback. Nothing was "
                "recorded: register the redirect URI without the trailing slash and start a new authorization.",
                ok=False,
            ),
            status_code=404,
            headers=SECURITY_HEADERS,
        )

    app.include_router(router)
    app.include_router(connect_router(connect_services))
    return app


#: The refresh coordinator's request is one small JSON object holding one ticket.
MAX_TOKEN_BODY_BYTES = 16 * 1024
MAX_TICKET_CHARS = 8192


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is longer than ``limit`` bytes (never read whole)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _token_answer(status: int, body: dict[str, object]) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})
