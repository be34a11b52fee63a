"""The Connect page: ``/papertrail/connections`` on the api-server (routes of the plugin app).

* ``GET /papertrail/connections``: every ``papertrail`` connection the user may read, with
  its grant health and a Connect / Reconnect button where the user may edit it. A browser
  without a (valid) Airflow session is sent to the auth manager's login page.
* ``GET /papertrail/connections/status``: the same health as JSON (the page polls it and
  reloads itself when a row changed, e.g. after the consent).
* ``POST /papertrail/connections/{conn_id}/connect``: starts the authorization (see
  :mod:`connect_start`) and answers ``303`` to the consent page (``mode=connect``) or shows
  the consent link to copy (``mode=link``, the notifiers send it too).

Airflow authenticates no route of a plugin app, so every route resolves the user itself
(Airflow's ``get_user``: a Bearer header or the ``_token`` cookie) and asks the auth
manager: connection ``GET`` to see a connection, ``PUT`` (edit) to connect it. The action
is a POST only, and refused unless its ``Origin`` (or ``Referer``) is the api-server's own
and its form carries a synchronizer token: HMAC-SHA256 under ``[api] secret_key`` of the
user id, the connection and the hour, compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from airflow_papertrail.plugins.connect_page import (
    MODE_CONNECT,
    MODE_LINK,
    SECURITY_HEADERS,
    Row,
    render_link,
    render_list,
    render_message,
    version,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from airflow_papertrail.health import GrantHealth
    from airflow_papertrail.plugins.connect_start import Started

log = logging.getLogger(__name__)

CONN_TYPE = "papertrail"
CSRF_FIELD = "csrf_token"
#: A form's token is valid in the hour it was rendered and the next one.
CSRF_WINDOW_SECONDS = 3600
MAX_FORM_BYTES = 4096
_CSRF_LABEL = b"airflow-provider-papertrail connect-page csrf v1"

_bearer = HTTPBearer(auto_error=False)
_HEX64 = re.compile(r"[0-9a-f]{64}")


async def current_user(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None
) -> Any:
    """Airflow's own ``get_user`` (401 missing/expired, 403 invalid), imported when first needed."""
    from airflow.api_fastapi.core_api.security import get_user

    return await get_user(request, None, credentials)


# -- CSRF --------------------------------------------------------------------------------------


def _csrf_key(secret_key: str) -> bytes:
    # A key of its own, derived from [api] secret_key: a token is no signature of anything else.
    return hmac.new(secret_key.encode("utf-8"), _CSRF_LABEL, hashlib.sha256).digest()


def csrf_token(secret_key: str, user_id: str, conn_id: str, now: float, *, bucket_offset: int = 0) -> str:
    """The synchronizer token of ``user_id``'s Connect form for ``conn_id`` in this hour."""
    bucket = int(now // CSRF_WINDOW_SECONDS) + bucket_offset
    message = "\0".join((str(user_id), conn_id, str(bucket))).encode("utf-8")
    return hmac.new(_csrf_key(secret_key), message, hashlib.sha256).hexdigest()


def verify_csrf(secret_key: str, token: str | None, user_id: str, conn_id: str, now: float) -> bool:
    """Constant-time check against this hour's and the previous hour's token."""
    if not token or not secret_key or not _HEX64.fullmatch(token):
        return False  # also keeps non-ASCII text from compare_digest (a TypeError, a 500)
    ok = False
    for offset in (0, -1):  # evaluate both: the time taken does not say which matched
        ok |= hmac.compare_digest(token, csrf_token(secret_key, user_id, conn_id, now, bucket_offset=offset))
    return ok


def _origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    default = {"http": 80, "https": 443}[parts.scheme]
    port = parts.port or default
    return f"{parts.scheme}://{parts.hostname.lower()}" + ("" if port == default else f":{port}")


def allowed_origins(request: Request, base_url: str | None) -> set[str]:
    """The api-server's own origin as the request reached it, and ``[api] base_url``'s."""
    origins = {o for o in (_origin_of(str(request.base_url)), _origin_of(base_url or "")) if o}
    return origins


def origin_ok(request: Request, base_url: str | None) -> bool:
    """The request comes from a page of this api-server (Origin, else Referer; neither: refused)."""
    origin = request.headers.get("origin")
    source = origin if origin is not None else request.headers.get("referer")
    if not source or source == "null":
        return False
    return _origin_of(source) in allowed_origins(request, base_url)


# -- services (replaced in unit tests) -----------------------------------------------------------


def _auth_manager() -> Any:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


def _list_connections() -> list[tuple[str, str | None, str | None]]:
    """(conn_id, description, team_name) of every ``papertrail`` connection in the metadata DB.

    Only these columns are selected: no password or extra is loaded, let alone decrypted.
    """
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session
    from sqlalchemy import select

    team = getattr(Connection, "team_name", None)
    columns = [Connection.conn_id, Connection.description] + ([team] if team is not None else [])
    with create_session() as session:
        rows = session.execute(
            select(*columns).where(Connection.conn_type == CONN_TYPE).order_by(Connection.conn_id)
        ).all()
    return [(r[0], r[1], r[2] if len(r) > 2 else None) for r in rows]


def _read_health(conn_id: str) -> GrantHealth:
    from airflow_papertrail.health import read_health
    from airflow_papertrail.token_store import OrmVariables

    return read_health(conn_id, backend=OrmVariables())


def _start(conn_id: str, *, user_name: str | None, notify: bool) -> Started:
    from airflow_papertrail.plugins.connect_start import start_authorization

    return start_authorization(conn_id, user_name=user_name, notify=notify)


def _secret_key() -> str:
    from airflow.configuration import conf

    return str(conf.get("api", "secret_key", fallback="") or "")


def _base_url() -> str | None:
    from airflow.configuration import conf

    return conf.get("api", "base_url", fallback=None) or None


@dataclass
class ConnectServices:
    """Everything the Connect routes reach outside the request (swapped in unit tests)."""

    auth_manager: Callable[[], Any] = _auth_manager
    list_connections: Callable[[], list[tuple[str, str | None, str | None]]] = _list_connections
    read_health: Callable[[str], GrantHealth] = _read_health
    start: Callable[..., Started] = _start
    secret_key: Callable[[], str] = _secret_key
    base_url: Callable[[], str | None] = _base_url
    clock: Callable[[], float] = time.time
    #: ``(request, bearer credentials) -> user``; raises HTTPException 401/403.
    current_user: Callable[..., Awaitable[Any]] = current_user


# -- authorization -------------------------------------------------------------------------------


def _details(conn_id: str | None, team: str | None = None) -> Any:
    from airflow.api_fastapi.auth.managers.models.resource_details import ConnectionDetails

    if team is not None:
        try:
            return ConnectionDetails(conn_id=conn_id, team_name=team)
        except TypeError:  # an Airflow without teams
            pass
    return ConnectionDetails(conn_id=conn_id)


def _may(services: ConnectServices, user: Any, method: str, conn_id: str | None, team: str | None = None) -> bool:
    return bool(
        services.auth_manager().is_authorized_connection(method=method, details=_details(conn_id, team), user=user)
    )


def _user_id(user: Any) -> str:
    return str(user.get_id())


def _user_name(user: Any) -> str:
    try:
        return str(user.get_name())
    except Exception:
        return _user_id(user)


def _wants_html(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "text/html" in accept and "application/json" not in accept.split(",")[0]


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers=SECURITY_HEADERS)


def _refusal(request: Request, status: int, title: str, message: str, root_path: str) -> Response:
    if _wants_html(request):
        return _html(render_message(title, message, root_path=root_path), status)
    return JSONResponse({"detail": message}, status_code=status, headers={"Cache-Control": "no-store"})


def _login_redirect(request: Request, services: ConnectServices) -> Response | None:
    """303 to the auth manager's login page, coming back here (None: no safe way to do it)."""
    from airflow.api_fastapi.core_api.security import is_safe_url

    next_url = str(request.url)
    if not is_safe_url(next_url, request=request):
        return None
    try:
        login = str(services.auth_manager().get_url_login(next_url=next_url))
    except Exception:
        return None
    if "next=" not in login:  # Airflow 3.2's SimpleAuthManager ignores next_url; its login page reads ?next=
        login += ("&" if "?" in login else "?") + urlencode({"next": next_url})
    return RedirectResponse(login, status_code=303, headers={"Cache-Control": "no-store"})


async def _user_or_refusal(request: Request, services: ConnectServices, *, page: bool) -> Any:
    """The user, or a Response: login redirect (browser GET of the page), 401 or 403."""
    root = request.scope.get("root_path", "")
    try:
        credentials = await _bearer(request)
        return await services.current_user(request, credentials)
    except HTTPException as exc:
        if exc.status_code == 401 and page and request.method == "GET" and _wants_html(request):
            redirect = _login_redirect(request, services)
            if redirect is not None:
                return redirect
        title = "Sign in to Airflow" if exc.status_code == 401 else "Not allowed"
        message = (
            "Sign in to Airflow first (your session is missing or has expired)."
            if exc.status_code == 401
            else "Your Airflow session is not valid; sign in again."
        )
        return _refusal(request, exc.status_code, title, message, root)


# -- routes --------------------------------------------------------------------------------------


def _rows(services: ConnectServices, user: Any, *, with_tokens: bool) -> list[Row]:
    now = services.clock()
    secret = services.secret_key() if with_tokens else ""
    rows = []
    for conn_id, description, team in services.list_connections():
        if not _may(services, user, "GET", conn_id, team):
            continue
        may_edit = _may(services, user, "PUT", conn_id, team)
        token = csrf_token(secret, _user_id(user), conn_id, now) if (may_edit and secret) else None
        rows.append(Row(conn_id, description, services.read_health(conn_id), may_edit, token))
    return rows


def _status_entry(row: Row) -> dict[str, Any]:
    h = row.health
    return {
        "conn_id": row.conn_id,
        "state": h.state,
        "version": version(h),
        "generation": h.generation,
        "access_expires_at": h.access_expires_at,
        "refresh_expires_at": h.refresh_expires_at,
        "last_refresh_at": h.last_refresh_at,
        "last_used_at": h.last_used_at,
        "last_error": {"code": h.last_error.get("code"), "description": h.last_error.get("description")}
        if h.last_error
        else None,
        "scopes": list(h.scopes),
        "may_connect": row.may_edit,
    }


async def _form(request: Request) -> dict[str, str] | None:
    """The url-encoded form, at most MAX_FORM_BYTES (None: too large or not a form)."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            return None
        chunks.append(chunk)
    try:
        return dict(parse_qsl(b"".join(chunks).decode("ascii"), keep_blank_values=True, max_num_fields=8))
    except (UnicodeDecodeError, ValueError):
        return None


def connect_router(services: ConnectServices | None = None) -> APIRouter:
    """The Connect page's routes (mounted with the callback under ``/papertrail``)."""
    services = services or ConnectServices()
    router = APIRouter()

    def page(request: Request, user: Any, *, flash: tuple[str, bool] | None = None, status: int = 200) -> Response:
        root = request.scope.get("root_path", "")
        if not _may(services, user, "GET", None):
            return _refusal(request, 403, "Not allowed", "You may not read connections in this Airflow.", root)
        rows = _rows(services, user, with_tokens=True)
        return _html(
            render_list(rows, root_path=root, user_name=_user_name(user), flash=flash, now=services.clock()), status
        )

    @router.get("/connections", response_class=HTMLResponse)
    async def connections(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        user = await _user_or_refusal(request, services, page=True)
        if isinstance(user, Response):
            return user
        return await run_in_threadpool(page, request, user)

    @router.get("/connections/status")
    async def connections_status(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        user = await _user_or_refusal(request, services, page=False)
        if isinstance(user, Response):
            return user
        if not _may(services, user, "GET", None):
            return JSONResponse({"detail": "You may not read connections."}, status_code=403)

        def entries() -> list[dict[str, Any]]:
            return [_status_entry(r) for r in _rows(services, user, with_tokens=False)]

        body = {"connections": await run_in_threadpool(entries), "at": services.clock()}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @router.post("/connections/{conn_id}/connect")
    async def connect(conn_id: str, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        root = request.scope.get("root_path", "")
        user = await _user_or_refusal(request, services, page=False)
        if isinstance(user, Response):
            return user
        if not origin_ok(request, services.base_url()):
            return _refusal(
                request, 403, "Refused", "This request did not come from a page of this Airflow (Origin check).", root
            )
        form = await _form(request)
        if form is None or not verify_csrf(
            services.secret_key(), form.get(CSRF_FIELD), _user_id(user), conn_id, services.clock()
        ):
            return _refusal(
                request,
                403,
                "Refused",
                "The form has expired or was not issued to you (CSRF check); reload the page and try again.",
                root,
            )
        mode = form.get("mode", MODE_CONNECT)
        if mode not in (MODE_CONNECT, MODE_LINK):
            return _refusal(request, 400, "Bad request", "Unknown action.", root)

        def act() -> Response:
            from airflow_papertrail.plugins.connect_start import ConnectRefused

            teams = {c: t for c, _, t in services.list_connections()}
            if conn_id not in teams:
                return _refusal(request, 404, "No such connection", f"No papertrail connection {conn_id!r}.", root)
            if not _may(services, user, "PUT", conn_id, teams.get(conn_id)):
                return _refusal(
                    request,
                    403,
                    "Not allowed",
                    f"You may not edit connection {conn_id!r}, so you cannot connect it.",
                    root,
                )
            try:
                started = services.start(conn_id, user_name=_user_name(user), notify=mode == MODE_LINK)
            except ConnectRefused as exc:
                return page(request, user, flash=(str(exc), False), status=409)
            if mode == MODE_LINK:
                return _html(
                    render_link(
                        conn_id=conn_id,
                        consent_url=started.consent_url,
                        expires_at=started.expires_at,
                        root_path=root,
                        run_id=started.run_id,
                    )
                )
            return RedirectResponse(started.consent_url, status_code=303, headers={"Cache-Control": "no-store"})

        return await run_in_threadpool(act)

    return router
