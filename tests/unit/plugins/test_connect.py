"""The Connect page (FastAPI TestClient): who sees what, CSRF and Origin checks, escaping,
the start of an authorization, and the authorize task adopting it."""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass, replace
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography.fernet import Fernet
from fastapi import HTTPException
from fastapi.testclient import TestClient

from airflow_papertrail.authorization import (
    CAPTURED,
    ERROR,
    PENDING,
    REDEEMING,
    AuthorizationStore,
    PendingAuthorization,
)
from airflow_papertrail.exceptions import PapertrailError
from airflow_papertrail.health import NOT_CONNECTED, REAUTHORIZATION_REQUIRED, VALID, GrantHealth
from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig, build_authorization_request
from airflow_papertrail.oauth.envelope import TokenCipher
from airflow_papertrail.operators.papertrail import PapertrailAuthorizeOperator, _truthy, adopt_pending
from airflow_papertrail.plugins.callback_app import create_app
from airflow_papertrail.plugins.connect import (
    CSRF_WINDOW_SECONDS,
    ConnectServices,
    csrf_token,
    verify_csrf,
)
from airflow_papertrail.plugins.connect_page import SECURITY_HEADERS
from airflow_papertrail.plugins.connect_start import (
    AUTHORIZE_DAG_ID,
    ORIGIN_CONNECT,
    ConnectRefused,
    Started,
    start_authorization,
)
from tests.unit.plugins.test_callback import MemoryEntries
from tests.unit.test_token_store import MemoryVariables

SECRET_KEY = "unit-secret-key-" + "k" * 24
BASE = "http://testserver"
NOW = 1_800_000_000.0
CONFIG = OAuthClientConfig(
    client_id="cid",
    client_secret="s" * 20,
    redirect_uri="https://airflow.example.com/papertrail/callback",
    system="xero",
    issuer="https://www.papertrail-ai.com",
)


@dataclass(frozen=True)
class User:
    name: str
    role: str  # "none" | "reader" | "editor"

    def get_id(self) -> str:
        return self.name

    def get_name(self) -> str:
        return self.name


USERS = {"nobody": User("nobody", "none"), "reader": User("reader", "reader"), "editor": User("editor", "editor")}


class AuthManager:
    """reader: GET on every connection; editor: GET and PUT, except on ``locked`` (GET only)."""

    def is_authorized_connection(self, *, method, details, user):
        if user.role == "editor":
            return method == "GET" or (details.conn_id != "locked")
        return user.role == "reader" and method == "GET"

    def get_url_login(self, **kwargs):
        from urllib.parse import urlencode

        return "/auth/login?" + urlencode({"next": kwargs["next_url"]})


async def fake_user(request, credentials):
    token = credentials.credentials if credentials else request.cookies.get("_token")
    if not token:
        raise HTTPException(401, "Not authenticated")
    if token == "expired":
        raise HTTPException(401, "Token Expired")
    if token not in USERS:
        raise HTTPException(403, "Invalid JWT token")
    return USERS[token]


class Env:
    def __init__(self) -> None:
        self.health = {
            "pt_new": GrantHealth(conn_id="pt_new"),
            "pt_dead": GrantHealth(
                conn_id="pt_dead",
                state=REAUTHORIZATION_REQUIRED,
                generation=3,
                scopes=["accounting.read"],
                last_error={"code": "invalid_grant", "description": "<img src=x onerror=alert(1)> revoked", "at": NOW},
            ),
            "locked": GrantHealth(conn_id="locked", state=VALID, generation=1, access_expires_at=NOW + 1800),
        }
        self.connections = [
            ("locked", None, None),
            ("pt_dead", "<b>Client & Co</b>", None),
            ("pt_new", None, None),
        ]
        self.started: list[tuple[str, str | None, bool]] = []
        self.refuse: str | None = None
        self.services = ConnectServices(
            auth_manager=AuthManager,
            list_connections=lambda: list(self.connections),
            read_health=lambda c: self.health[c],
            start=self.start,
            secret_key=lambda: SECRET_KEY,
            base_url=lambda: None,
            clock=lambda: NOW,
            current_user=fake_user,
        )
        self.client = TestClient(
            create_app(entries=MemoryEntries(MemoryVariables()), connect_services=self.services),
            base_url=BASE,
            follow_redirects=False,
        )

    def start(self, conn_id, *, user_name, notify):
        if self.refuse:
            raise ConnectRefused(self.refuse)
        self.started.append((conn_id, user_name, notify))
        return Started(
            conn_id, "https://consent.example/authorize?state=S&code_challenge=C", "a" * 40, "connect__x", NOW + 600
        )

    def token(self, user: str, conn_id: str) -> str:
        return csrf_token(SECRET_KEY, user, conn_id, NOW)

    def post(self, conn_id, *, user="editor", token=None, origin=BASE, mode="connect", headers=None, **kw):
        hdrs = {"Authorization": f"Bearer {user}"} if user else {}
        if origin is not None:
            hdrs["Origin"] = origin
        hdrs.update(headers or {})
        data = {"mode": mode}
        if token is not False:
            data["csrf_token"] = token if token is not None else self.token(user or "", conn_id)
        return self.client.post(f"/connections/{conn_id}/connect", data=data, headers=hdrs, **kw)


@pytest.fixture
def env() -> Env:
    return Env()


HTML = {"Accept": "text/html,application/xhtml+xml"}


# -- who may see the page ------------------------------------------------------------------------


def test_anonymous_browser_is_sent_to_the_login_page(env):
    response = env.client.get("/connections", headers=HTML)
    assert response.status_code == 303
    location = response.headers["location"]
    assert location.startswith("/auth/login?")
    assert parse_qs(urlsplit(location).query)["next"] == [f"{BASE}/connections"]


def test_login_redirect_carries_next_even_if_the_auth_manager_drops_it(env):
    env.services.auth_manager = lambda: type(
        "Old", (AuthManager,), {"get_url_login": lambda self, **kw: "/auth/login"}
    )()
    location = env.client.get("/connections", headers=HTML).headers["location"]
    assert urlsplit(location).path == "/auth/login"
    assert parse_qs(urlsplit(location).query)["next"] == [f"{BASE}/connections"]


def test_expired_session_of_a_browser_is_sent_to_the_login_page(env):
    response = env.client.get("/connections", headers=HTML, cookies={"_token": "expired"})
    assert response.status_code == 303 and response.headers["location"].startswith("/auth/login?")


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer expired"}, 401), ({"Authorization": "Bearer forged"}, 403)],
)
def test_api_style_requests_get_401_or_403(env, headers, status):
    for path in ("/connections", "/connections/status"):
        response = env.client.get(path, headers={"Accept": "application/json", **headers})
        assert response.status_code == status, path
        assert "pt_dead" not in response.text


def test_a_user_without_connection_read_access_is_refused(env):
    response = env.client.get("/connections", headers={**HTML, "Authorization": "Bearer nobody"})
    assert response.status_code == 403
    assert "pt_dead" not in response.text
    status = env.client.get("/connections/status", headers={"Authorization": "Bearer nobody"})
    assert status.status_code == 403


def test_reader_sees_health_but_no_connect_button(env):
    response = env.client.get("/connections", headers={**HTML, "Authorization": "Bearer reader"})
    assert response.status_code == 200
    text = response.text
    assert "reauthorization_required" in text and "invalid_grant" in text and "accounting.read" in text
    assert "<form" not in text and "csrf_token" not in text
    assert text.count("You may view this connection but not edit it.") == 3


def test_editor_gets_connect_and_reconnect_with_a_token_per_connection(env):
    text = env.client.get("/connections", headers={**HTML, "Authorization": "Bearer editor"}).text
    row = {m.group(1): m.group(0) for m in re.finditer(r'<tr id="conn-([^"]+)".*?</tr>', text)}
    assert set(row) == {"locked", "pt_dead", "pt_new"}
    assert ">Connect</button>" in row["pt_new"] and ">Reconnect</button>" in row["pt_dead"]
    assert "<form" not in row["locked"]  # GET only on that one
    assert env.token("editor", "pt_dead") in row["pt_dead"] and env.token("editor", "pt_new") in row["pt_new"]
    assert "target=_top" in row["pt_new"] and 'method=post action="/connections/pt_new/connect"' in row["pt_new"]
    assert "Get a link to send" in row["pt_new"]


def test_every_value_is_escaped_and_headers_are_strict(env):
    response = env.client.get("/connections", headers={**HTML, "Authorization": "Bearer editor"})
    text = response.text
    assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "<b>Client" not in text and "&lt;b&gt;Client &amp; Co&lt;/b&gt;" in text
    for header, value in SECURITY_HEADERS.items():
        assert response.headers[header] == value
    csp = response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    # the one inline script and style are the ones the policy's hashes allow
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        body = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.S).group(1)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in csp


def test_status_route_lists_what_the_user_may_read(env):
    body = env.client.get("/connections/status", headers={"Authorization": "Bearer reader"}).json()
    states = {c["conn_id"]: c["state"] for c in body["connections"]}
    assert states == {"locked": VALID, "pt_dead": REAUTHORIZATION_REQUIRED, "pt_new": NOT_CONNECTED}
    dead = next(c for c in body["connections"] if c["conn_id"] == "pt_dead")
    assert dead["last_error"]["code"] == "invalid_grant" and dead["may_connect"] is False
    before = dead["version"]
    env.health["pt_dead"] = replace(env.health["pt_dead"], state=VALID, generation=4, last_error=None)
    after = env.client.get("/connections/status", headers={"Authorization": "Bearer reader"}).json()
    assert next(c for c in after["connections"] if c["conn_id"] == "pt_dead")["version"] != before


# -- CSRF token ----------------------------------------------------------------------------------


def test_csrf_token_binds_user_connection_and_time():
    token = csrf_token(SECRET_KEY, "editor", "pt", NOW)
    assert verify_csrf(SECRET_KEY, token, "editor", "pt", NOW)
    assert verify_csrf(SECRET_KEY, token, "editor", "pt", NOW + CSRF_WINDOW_SECONDS)  # the next hour still
    assert not verify_csrf(SECRET_KEY, token, "editor", "pt", NOW + 2 * CSRF_WINDOW_SECONDS + 1)
    assert not verify_csrf(SECRET_KEY, token, "other", "pt", NOW)
    assert not verify_csrf(SECRET_KEY, token, "editor", "pt2", NOW)
    assert not verify_csrf("another-secret-key" * 2, token, "editor", "pt", NOW)
    assert not verify_csrf(SECRET_KEY, token[:-1] + ("0" if token[-1] != "0" else "1"), "editor", "pt", NOW)
    assert not verify_csrf(SECRET_KEY, "", "editor", "pt", NOW)
    assert not verify_csrf("", token, "editor", "pt", NOW)
    # "user\0conn" boundaries cannot be shifted
    assert csrf_token(SECRET_KEY, "a", "bc", NOW) != csrf_token(SECRET_KEY, "ab", "c", NOW)


# -- the Connect action --------------------------------------------------------------------------


def test_connect_answers_303_to_the_consent_page(env):
    response = env.post("pt_new")
    assert response.status_code == 303
    assert response.headers["location"] == "https://consent.example/authorize?state=S&code_challenge=C"
    assert response.headers["cache-control"] == "no-store"
    assert env.started == [("pt_new", "editor", False)]


def test_get_a_link_shows_it_and_asks_the_notifiers(env):
    response = env.post("pt_dead", mode="link")
    assert response.status_code == 200
    assert 'value="https://consent.example/authorize?state=S&amp;code_challenge=C"' in response.text
    assert 'href="/connections#conn-pt_dead"' in response.text
    assert env.started == [("pt_dead", "editor", True)]


def test_a_referer_of_this_server_is_enough_without_origin(env):
    response = env.post("pt_new", origin=None, headers={"Referer": f"{BASE}/connections"})
    assert response.status_code == 303


@pytest.mark.parametrize(
    "case",
    [
        "no-origin",
        "foreign-origin",
        "null-origin",
        "foreign-referer",
        "other-port",
        "bad-token",
        "no-token",
        "other-users-token",
        "other-connection-token",
        "stale-token",
    ],
)
def test_forged_requests_are_refused_and_start_nothing(env, case):
    kwargs: dict = {}
    if case == "no-origin":
        kwargs["origin"] = None
    elif case == "foreign-origin":
        kwargs["origin"] = "https://evil.example"
    elif case == "null-origin":
        kwargs["origin"] = "null"
    elif case == "foreign-referer":
        kwargs.update(origin=None, headers={"Referer": "https://evil.example/x"})
    elif case == "other-port":
        kwargs["origin"] = "http://testserver:8081"
    elif case == "bad-token":
        kwargs["token"] = "0" * 64
    elif case == "no-token":
        kwargs["token"] = False
    elif case == "other-users-token":
        kwargs["token"] = env.token("reader", "pt_new")
    elif case == "other-connection-token":
        kwargs["token"] = env.token("editor", "pt_dead")
    elif case == "stale-token":
        kwargs["token"] = csrf_token(SECRET_KEY, "editor", "pt_new", NOW - 2 * CSRF_WINDOW_SECONDS)
    response = env.post("pt_new", **kwargs)
    assert response.status_code == 403, response.text
    assert env.started == []


@pytest.mark.parametrize(
    ("user", "status"), [(None, 401), ("expired", 401), ("forged", 403), ("reader", 403), ("nobody", 403)]
)
def test_users_who_may_not_edit_cannot_connect(env, user, status):
    response = env.post("pt_new", user=user)
    assert response.status_code == status
    assert env.started == []


def test_editor_without_edit_right_on_that_connection_is_refused(env):
    response = env.post("locked", headers={"Accept": "text/html"})
    assert response.status_code == 403 and "may not edit connection" in response.text
    assert env.started == []


def test_get_on_the_action_is_refused(env):
    response = env.client.get("/connections/pt_new/connect", headers={"Authorization": "Bearer editor"})
    assert response.status_code == 405
    assert env.started == []


def test_unknown_connection_and_mode(env):
    assert env.post("nope").status_code == 404
    assert env.post("pt_new", mode="delete").status_code == 400
    assert env.started == []


def test_a_refusal_is_shown_on_the_page(env):
    env.refuse = "The papertrail_authorize DAG is paused; nothing was started. Unpause it and retry."
    response = env.post("pt_new", headers={"Accept": "text/html"})
    assert response.status_code == 409
    assert "is paused; nothing was started" in response.text and "id=flash" in response.text
    assert "<table id=connections" in response.text


# -- the callback links back for a Connect-page authorization ------------------------------------------


@pytest.mark.parametrize("origin", [ORIGIN_CONNECT, None])
def test_callback_page_links_back_only_for_connect_page_authorizations(origin):
    backend = MemoryVariables()
    store = AuthorizationStore(cipher=TokenCipher([Fernet.generate_key().decode()]), backend=backend)
    client = TestClient(create_app(entries=MemoryEntries(backend), store=store))
    request = build_authorization_request(CONFIG, now=time.time())
    pending = PendingAuthorization.from_request(request, conn_id="pt", expected_issuer=CONFIG.issuer, origin=origin)
    store.save(pending)
    response = client.get("/callback", params={"code": "C" * 30, "state": pending.state, "iss": CONFIG.issuer})
    assert response.status_code == 200 and "Authorization received" in response.text
    assert ("Back to Papertrail-ai connections" in response.text) is (origin == ORIGIN_CONNECT)
    if origin:
        assert 'href="/papertrail/connections#conn-pt"' in response.text
        assert "C" * 30 not in response.text and pending.state not in response.text
    assert "http-equiv" not in response.text  # a link, never an automatic redirect


def test_forged_state_gets_no_back_link():
    client = TestClient(
        create_app(
            entries=MemoryEntries(MemoryVariables()),
            store=AuthorizationStore(backend=MemoryVariables(), cipher=TokenCipher([Fernet.generate_key().decode()])),
        )
    )
    response = client.get("/callback", params={"code": "abc", "state": "A" * 43})
    assert response.status_code == 400 and "Back to" not in response.text


# -- start_authorization -------------------------------------------------------------------------


class Recorder:
    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple] = []
        self.fail = fail

    def __call__(self, dag_id, run_id, conf, user_name):
        self.calls.append((dag_id, run_id, conf, user_name))
        if self.fail:
            raise self.fail


def _store():
    return AuthorizationStore(cipher=TokenCipher([Fernet.generate_key().decode()]), backend=MemoryVariables())


def test_start_issues_one_pending_entry_and_triggers_the_run_for_it():
    store, trigger = _store(), Recorder()
    started = start_authorization(
        "pt",
        user_name="editor",
        notify=False,
        store=store,
        client_for=lambda c: OAuthClient(CONFIG),
        check_dag=lambda: None,
        trigger=trigger,
    )
    [(dag_id, run_id, conf, user_name)] = trigger.calls
    assert (dag_id, user_name) == (AUTHORIZE_DAG_ID, "editor") and run_id == started.run_id
    assert conf == {"conn_id": "pt", "authorization_id": started.authorization_id, "notify": False}
    assert re.fullmatch(r"[A-Za-z0-9_.~:+-]+", run_id)  # Airflow's default allowed_run_id_pattern
    pending = store.load(started.authorization_id)
    assert (pending.status, pending.origin, pending.dag_id, pending.run_id, pending.task_id) == (
        PENDING,
        ORIGIN_CONNECT,
        AUTHORIZE_DAG_ID,
        run_id,
        "authorize",
    )
    assert pending.consent_url == started.consent_url and pending.code_verifier
    query = parse_qs(urlsplit(started.consent_url).query)
    assert query["state"] == [pending.state] and "code_challenge" in query
    assert pending.code_verifier not in started.consent_url and CONFIG.client_secret not in started.consent_url


def test_start_issues_nothing_when_the_dag_cannot_run():
    store = _store()

    def paused():
        raise ConnectRefused("paused")

    with pytest.raises(ConnectRefused, match="paused"):
        start_authorization(
            "pt",
            user_name="e",
            notify=False,
            store=store,
            client_for=lambda c: OAuthClient(CONFIG),
            check_dag=paused,
            trigger=Recorder(),
        )
    assert store.backend.values == {}


def test_start_deletes_the_entry_when_the_trigger_fails():
    store = _store()
    with pytest.raises(ConnectRefused, match="could not be triggered"):
        start_authorization(
            "pt",
            user_name="e",
            notify=False,
            store=store,
            client_for=lambda c: OAuthClient(CONFIG),
            check_dag=lambda: None,
            trigger=Recorder(fail=ValueError("Dag with dag_id 'x' does not allow manual runs")),
        )
    assert store.backend.values == {}


# -- the authorize task adopts it ------------------------------------------------------------------


def _issued(store, **changes) -> PendingAuthorization:
    request = build_authorization_request(CONFIG, now=NOW)
    pending = PendingAuthorization.from_request(
        request, conn_id="pt", dag_id=AUTHORIZE_DAG_ID, run_id="connect__r1", task_id="authorize", origin=ORIGIN_CONNECT
    )
    pending = replace(pending, **changes)
    store.save(pending)
    return pending


@pytest.mark.parametrize("status", [PENDING, CAPTURED, ERROR])
def test_adopt_accepts_an_entry_issued_for_this_run(status):
    store = _store()
    pending = _issued(store, status=status)
    adopted = adopt_pending(
        store, pending.authorization_id, conn_id="pt", dag_id=AUTHORIZE_DAG_ID, run_id="connect__r1", now=NOW + 1
    )
    assert adopted.authorization_id == pending.authorization_id and adopted.consent_url == pending.consent_url


@pytest.mark.parametrize(
    ("changes", "kwargs", "match"),
    [
        ({}, {"conn_id": "other"}, "was issued for connection 'pt'"),
        ({}, {"run_id": "manual__other"}, "not issued for this DAG run"),
        ({}, {"dag_id": "another_dag"}, "not issued for this DAG run"),
        ({"status": REDEEMING}, {}, "already used"),
        ({}, {"now": NOW + 601}, "has expired"),
        ({"consent_url": None}, {}, "has expired"),
    ],
)
def test_adopt_refuses_anything_else(changes, kwargs, match):
    store = _store()
    pending = _issued(store, **changes)
    args = {"conn_id": "pt", "dag_id": AUTHORIZE_DAG_ID, "run_id": "connect__r1", "now": NOW + 1, **kwargs}
    before = dict(store.backend.values)
    with pytest.raises(PapertrailError, match=match):
        adopt_pending(store, pending.authorization_id, **args)
    assert store.backend.values == before  # nothing changed, nothing issued


def test_adopt_refuses_a_missing_entry():
    with pytest.raises(PapertrailError, match="does not exist"):
        adopt_pending(_store(), "f" * 40, conn_id="pt", dag_id=AUTHORIZE_DAG_ID, run_id="r", now=NOW)


@dataclass
class _TI:
    dag_id: str = AUTHORIZE_DAG_ID
    run_id: str = "connect__r1"
    task_id: str = "authorize"


@pytest.mark.parametrize(("notify", "called"), [("False", False), ("True", True), (True, True), ("", False)])
def test_authorize_task_returns_the_adopted_link_and_notifies_only_when_asked(monkeypatch, notify, called):
    import airflow_papertrail.operators.papertrail as module

    store = _store()
    pending = _issued(store)
    monkeypatch.setattr(module, "AuthorizationStore", lambda **kw: store)
    monkeypatch.setattr(PapertrailAuthorizeOperator, "_warn_without_triggerer", lambda self: None)
    seen = []
    op = PapertrailAuthorizeOperator(
        task_id="authorize",
        papertrail_conn_id="pt",
        authorization_id=pending.authorization_id,
        notify=notify,
        notifiers=[lambda ctx: seen.append(ctx["papertrail_consent_url"])],
    )
    result = op.execute({"ti": _TI()})
    # Only a link meant to be sent is published (XCom, log); a Connect-mode link is not.
    assert result["consent_url"] == (pending.consent_url if called else None)
    assert result["authorization_id"] == pending.authorization_id
    assert seen == ([pending.consent_url] if called else [])
    assert len(store.backend.values) == 1  # adopted, nothing new issued


def test_connect_mode_publishes_the_state_in_neither_log_nor_xcom(monkeypatch, caplog, capsys):
    """Review finding H1 (failed before the fix): whoever could read the authorize task's log or
    XCom (a DAG viewer, with no connection right) could finish the consent with an
    organisation of their own."""
    import logging

    import airflow_papertrail.operators.papertrail as module

    store = _store()
    pending = _issued(store)
    monkeypatch.setattr(module, "AuthorizationStore", lambda **kw: store)
    monkeypatch.setattr(PapertrailAuthorizeOperator, "_warn_without_triggerer", lambda self: None)
    op = PapertrailAuthorizeOperator(
        task_id="authorize", papertrail_conn_id="pt", authorization_id=pending.authorization_id, notify="False"
    )
    caplog.set_level(logging.INFO)
    op.log.propagate = True
    result = op.execute({"ti": _TI()})
    logged = caplog.text + capsys.readouterr().out  # the task logger may print through structlog
    assert pending.state not in str(result)
    assert pending.state not in logged
    assert "the link is not logged" in logged


def test_an_older_dag_copy_adopts_from_the_run_conf(monkeypatch):
    """Review finding M2 (failed before the fix): a DAG copied before the Connect page existed does
    not template authorization_id; the task issued a second authorization nobody redeemed."""
    import airflow_papertrail.operators.papertrail as module

    store = _store()
    pending = _issued(store)
    monkeypatch.setattr(module, "AuthorizationStore", lambda **kw: store)
    monkeypatch.setattr(PapertrailAuthorizeOperator, "_warn_without_triggerer", lambda self: None)
    seen = []
    op = PapertrailAuthorizeOperator(
        task_id="authorize", papertrail_conn_id="pt", notifiers=[lambda ctx: seen.append(1)]
    )
    run = type("Run", (), {"conf": {"authorization_id": pending.authorization_id, "notify": False}})()
    result = op.execute({"ti": _TI(), "dag_run": run})
    assert result["authorization_id"] == pending.authorization_id
    assert result["consent_url"] is None and seen == []
    assert len(store.backend.values) == 1  # adopted, nothing new issued


def test_a_non_ascii_csrf_token_is_refused_not_a_crash():
    """Review finding L2 (a TypeError, HTTP 500, before the fix)."""
    assert not verify_csrf("k" * 32, "\u00e9" * 64, "editor", "pt", NOW)
    assert not verify_csrf("k" * 32, "A" * 64, "editor", "pt", NOW)
    assert verify_csrf("k" * 32, csrf_token("k" * 32, "editor", "pt", NOW), "editor", "pt", NOW)


def test_truthy():
    assert _truthy("True") and _truthy(True) and _truthy("1")
    assert not any(_truthy(v) for v in ("False", "false", "0", "", "None", False, None))
