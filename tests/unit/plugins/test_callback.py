"""The OAuth callback route (FastAPI TestClient) and its security table, plus a fuzz."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import pytest
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_papertrail.authorization import (
    CAPTURED,
    ERROR,
    PENDING,
    AuthorizationStore,
    PendingAuthorization,
    pending_variable_key,
)
from airflow_papertrail.oauth import OAuthClientConfig, build_authorization_request
from airflow_papertrail.oauth.envelope import TokenCipher
from airflow_papertrail.plugins.callback_app import REDACTED_QUERY, create_app
from airflow_papertrail.plugins.pages import SECURITY_HEADERS
from tests.unit.test_token_store import MemoryVariables

CONFIG = OAuthClientConfig(
    client_id="cid",
    client_secret="s" * 20,
    redirect_uri="https://airflow.example.com/papertrail/callback",
    system="xero",
    issuer="https://www.papertrail-ai.com",
)


@dataclass
class _Entry:
    raw: str | None
    key: str
    values: dict

    def write(self, value: str) -> None:
        self.values[self.key] = value


class MemoryEntries:
    """Same contract as the row lock: exclusive read-modify-write of one key."""

    def __init__(self, backend: MemoryVariables) -> None:
        self.backend = backend
        self.lock = threading.Lock()
        self.writes = 0

    @contextlib.contextmanager
    def locked(self, key):
        with self.lock:
            entry = _Entry(self.backend.values.get(key), key, self.backend.values)
            before = dict(self.backend.values)
            yield entry
            if self.backend.values != before:
                self.writes += 1


@pytest.fixture
def env():
    backend = MemoryVariables()
    store = AuthorizationStore(cipher=TokenCipher([Fernet.generate_key().decode()]), backend=backend)
    entries = MemoryEntries(backend)
    client = TestClient(create_app(entries=entries, store=store))

    def new_pending(ttl=600.0, **changes) -> PendingAuthorization:
        request = build_authorization_request(CONFIG, now=time.time(), ttl=ttl)
        pending = PendingAuthorization.from_request(request, conn_id="pt", expected_issuer=CONFIG.issuer)
        if changes:
            from dataclasses import replace

            pending = replace(pending, **changes)
        store.save(pending)
        return pending

    return client, store, backend, entries, new_pending


def _get(client, params):
    query = params if isinstance(params, str) else urlencode(params)
    return client.get(f"/callback?{query}")


def test_code_is_captured_once_and_encrypted(env):
    client, store, backend, entries, new_pending = env
    pending = new_pending()
    code = "AUTHCODE-" + "x" * 30
    response = _get(client, {"code": code, "state": pending.state, "iss": CONFIG.issuer})
    assert response.status_code == 200
    assert "Authorization received" in response.text and "close this tab" in response.text
    raw = backend.values[pending_variable_key(pending.authorization_id)]
    assert code not in raw
    loaded = store.load(pending.authorization_id)
    assert (loaded.status, loaded.code) == (CAPTURED, code)
    for header, value in SECURITY_HEADERS.items():
        assert response.headers[header] == value
    # replay: refused, nothing changed
    replay = _get(client, {"code": "OTHER-" + "y" * 30, "state": pending.state})
    assert replay.status_code == 409
    assert store.load(pending.authorization_id).code == code
    assert entries.writes == 1


def test_access_denied_is_recorded_as_final_outcome(env):
    client, store, _, _, new_pending = env
    pending = new_pending()
    response = _get(
        client,
        {
            "error": "access_denied",
            "error_description": "The user denied access",
            "state": pending.state,
            "iss": CONFIG.issuer,
        },
    )
    assert response.status_code == 200
    assert "Access not granted" in response.text
    loaded = store.load(pending.authorization_id)
    assert (loaded.status, loaded.error, loaded.error_description) == (ERROR, "access_denied", "The user denied access")


def _forged_state():
    from airflow_papertrail.oauth import new_state

    return new_state()


@pytest.mark.parametrize(
    ("make_query", "status", "fragment"),
    [
        (lambda p: {"code": "abc"}, 400, "Missing state"),
        (lambda p: {"code": "abc", "state": ""}, 400, "Missing state"),
        (lambda p: {"code": "abc", "state": _forged_state()}, 400, "Unknown authorization"),
        (
            lambda p: {"code": "abc", "state": p.state[:-1] + ("A" if p.state[-1] != "A" else "B")},
            400,
            "Unknown authorization",
        ),
        (lambda p: {"code": "abc", "state": "<script>alert(1)</script>"}, 400, "Unknown authorization"),
        (lambda p: {"state": p.state}, 400, "neither a code nor an error"),
        (lambda p: {"code": "abc", "error": "access_denied", "state": p.state}, 400, "both a code and an error"),
        (lambda p: {"code": "a b\x01", "state": p.state}, 400, "code is malformed"),
        (lambda p: {"code": "c" * 5000, "state": p.state}, 400, "too large"),
        (lambda p: {"code": "c" * 3000, "state": p.state}, 400, "code is malformed"),
        (lambda p: {"error": '"><img src=x onerror=alert(1)>', "state": p.state}, 400, "error parameter is malformed"),
        (lambda p: f"code=a&code=b&state={p.state}", 400, "appears twice"),
        (lambda p: f"code=a&state={p.state}&state={p.state}", 400, "appears twice"),
        (lambda p: "&".join(f"k{i}=v" for i in range(40)) + f"&code=a&state={p.state}", 400, "malformed"),
        (lambda p: {"code": "abc", "state": p.state, "iss": "https://evil.example.com"}, 400, "Wrong issuer"),
        (lambda p: "%ff%fe=%00&state=" + p.state, 400, None),
    ],
)
def test_security_table_refuses_and_changes_nothing(env, make_query, status, fragment):
    client, store, backend, entries, new_pending = env
    pending = new_pending()
    before = dict(backend.values)
    response = _get(client, make_query(pending))
    assert response.status_code == status, response.text
    if fragment:
        assert fragment in response.text
    assert "<script>" not in response.text and "<img" not in response.text
    assert backend.values == before
    assert store.load(pending.authorization_id).status == PENDING
    assert response.headers["Cache-Control"] == "no-store"


def test_expired_authorization_is_refused(env):
    client, store, backend, _, new_pending = env
    pending = new_pending(expires_at=time.time() - 1)
    before = dict(backend.values)
    response = _get(client, {"code": "abc", "state": pending.state})
    assert response.status_code == 410
    assert "expired" in response.text and "papertrail_authorize" in response.text
    assert backend.values == before


def test_envelope_of_another_authorization_is_refused(env):
    client, store, backend, _, new_pending = env
    a, b = new_pending(), new_pending()
    backend.values[pending_variable_key(b.authorization_id)] = backend.values[pending_variable_key(a.authorization_id)]
    before = dict(backend.values)
    response = _get(client, {"code": "abc", "state": b.state})
    assert response.status_code == 400
    assert backend.values == before


def test_storage_failure_is_503_not_500(env):
    client, _, backend, entries, new_pending = env
    pending = new_pending()

    @contextlib.contextmanager
    def broken(key):
        raise RuntimeError("database is locked")
        yield

    entries.locked = broken
    response = _get(client, {"code": "abc", "state": pending.state})
    assert response.status_code == 503
    assert "database" not in response.text


def test_query_string_is_scrubbed_before_the_access_log_reads_it(env):
    client, _, _, _, new_pending = env
    pending = new_pending()
    seen = {}

    def spy(app):
        async def middleware(scope, receive, send):
            await app(scope, receive, send)
            seen["query"] = scope.get("query_string")

        return middleware

    from fastapi import FastAPI

    outer = FastAPI()
    outer.mount("/papertrail", client.app)
    wrapped = TestClient(spy(outer))
    code = "SECRETCODE" + "z" * 20
    response = wrapped.get(f"/papertrail/callback?code={code}&state={pending.state}&iss={CONFIG.issuer}")
    assert response.status_code == 200
    assert seen["query"] == REDACTED_QUERY
    assert code.encode() not in seen["query"]


def test_unknown_paths_are_not_ours(env):
    client, *_ = env
    assert client.get("/callbackx").status_code == 404


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    query=st.one_of(
        st.text(max_size=600).map(lambda t: quote(t, safe="=&%;+")),
        st.lists(
            st.tuples(
                st.sampled_from(["code", "state", "error", "error_description", "iss", "x", ""]),
                st.text(max_size=200),
            ),
            max_size=8,
        ).map(urlencode),
    )
)
def test_fuzz_never_500_and_never_writes(env, query):
    client, _, backend, entries, new_pending = env
    if not backend.values:
        new_pending()
    before = dict(backend.values)
    writes = entries.writes
    response = client.get("/callback?" + query)
    assert response.status_code < 500
    assert backend.values == before
    assert entries.writes == writes


def test_a_callback_without_iss_is_refused_when_an_issuer_is_expected(env):
    """RFC 9207 2.4: with an expected issuer, a missing iss is refused, not only a wrong one."""
    client, store, backend, _, new_pending = env
    pending = new_pending()
    before = dict(backend.values)
    response = _get(client, {"code": "abc", "state": pending.state})
    assert response.status_code == 400 and "Missing issuer" in response.text
    assert backend.values == before and store.load(pending.authorization_id).status == PENDING
    ok = _get(client, {"code": "abc", "state": pending.state, "iss": CONFIG.issuer})
    assert ok.status_code == 200


def test_trailing_slash_callback_never_redirects_with_the_code(env):
    """Starlette's slash redirect answered before the route: code and state went to the access log and Location."""
    client, _, backend, _, new_pending = env
    pending = new_pending()
    seen = {}

    def spy(app):
        async def middleware(scope, receive, send):
            async def capture(message):
                if message["type"] == "http.response.start":
                    seen["headers"] = dict(message.get("headers") or [])
                await send(message)

            await app(scope, receive, capture)
            seen["query"] = scope.get("query_string")

        return middleware

    from fastapi import FastAPI

    outer = FastAPI()
    outer.mount("/papertrail", client.app)
    wrapped = TestClient(spy(outer), follow_redirects=False)
    code = "SLASHCODE" + "q" * 20
    before = dict(backend.values)
    response = wrapped.get(f"/papertrail/callback/?code={code}&state={pending.state}&iss={CONFIG.issuer}")
    assert response.status_code == 404, response.headers
    assert b"location" not in seen["headers"]
    assert code.encode() not in seen["query"] and pending.state.encode() not in seen["query"]
    assert code not in response.text and backend.values == before


def test_api_server_without_a_key_says_so_on_the_callback_page(env, monkeypatch):
    client, store, backend, _, new_pending = env
    pending = new_pending()
    from airflow_papertrail.exceptions import EncryptionKeyMissing

    def no_key(*args, **kwargs):
        raise EncryptionKeyMissing("no token encryption key is configured ([papertrail] token_encryption_keys)")

    monkeypatch.setattr(store, "decode", no_key)
    response = _get(client, {"code": "abc", "state": pending.state, "iss": CONFIG.issuer})
    assert response.status_code == 503
    assert "not configured" in response.text and "start a new" not in response.text


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", "application/json"),
        (b'["ticket"]', "application/json"),
        (b'{"ticket": 5}', "application/json"),
        (b"ticket=x", "application/x-www-form-urlencoded"),
        (b"", "application/json"),
    ],
)
def test_token_route_refuses_malformed_bodies_without_raising(env, body, content_type):
    client, *_ = env
    response = client.post("/token", content=body, headers={"Content-Type": content_type})
    assert response.status_code in (400, 401), response.text
    assert response.json()["error"] in ("invalid_request", "invalid_ticket")


def test_token_route_limits_the_body_before_parsing(env):
    client, *_ = env
    huge = b'{"ticket": "' + b"x" * (2 << 20) + b'"}'
    response = client.post("/token", content=huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"] == "invalid_request"

    def chunks():  # no Content-Length: the limit holds for a streamed body too
        for _ in range(64):
            yield b"x" * 65536

    response = client.post("/token", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
