"""The Papertrail-ai emulator, exercised over real loopback HTTP(S) with ``requests``."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import requests

from airflow_papertrail.testing import emulator as emulator_module
from airflow_papertrail.testing.emulator import (
    MODULES,
    SYSTEMS,
    EmulatorClient,
    PapertrailEmulator,
)
from tests.waiting import wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator

try:  # feed the session's log-leak canary, as the shared fixtures do
    from tests.conftest import remember_secrets
except ImportError:  # pragma: no cover - running this file on its own

    def remember_secrets(*values: str | None) -> None:
        return None


CLIENT_ID = "emulator-test-client"
# ':' '+' '/' '=' '%' make form-urlencoding before base64 (RFC 6749 2.3.1) matter.
CLIENT_SECRET = "emu-secret:with+plus/slash=eq%pct-" + "Kd7w" * 6
OTHER_ID = "other-client"
OTHER_SECRET = "other-secret-" + "Pq4v" * 6
REDIRECT = "http://127.0.0.1:8765/papertrail/callback"
REDIRECT_WITH_QUERY = "https://app.example.test/oauth/callback?tenant=acme"
OTHER_REDIRECT = "http://127.0.0.1:8765/other/callback"
TIMEOUT = 10
remember_secrets(CLIENT_SECRET, OTHER_SECRET)


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _clients() -> list[EmulatorClient]:
    return [
        EmulatorClient(CLIENT_ID, CLIENT_SECRET, [REDIRECT, REDIRECT_WITH_QUERY]),
        EmulatorClient(OTHER_ID, OTHER_SECRET, [OTHER_REDIRECT]),
    ]


@contextlib.contextmanager
def _run(**kwargs: Any) -> Iterator[PapertrailEmulator]:
    emu = PapertrailEmulator(clients=_clients(), **kwargs).start()
    try:
        yield emu
    finally:
        emu.stop()
        remember_secrets(*emu.issued_secrets)


@pytest.fixture
def emu() -> Iterator[PapertrailEmulator]:
    with _run() as emulator:
        yield emulator


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clocked(clock: FakeClock) -> Iterator[PapertrailEmulator]:
    with _run(clock=clock, access_token_ttl=60, code_ttl=30) as emulator:
        yield emulator


# -- helpers ------------------------------------------------------------------------------
def _authorize_params(**overrides: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT,
        "scope": "bank gl",
        "state": "st-" + secrets.token_urlsafe(16),
        "system": "xero",
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hidden: dict[str, str] = {}
        self.buttons: list[dict[str, str | None]] = []
        self.form: dict[str, str | None] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "input" and attributes.get("type") == "hidden":
            self.hidden[attributes["name"] or ""] = attributes.get("value") or ""
        elif tag == "button":
            self.buttons.append(attributes)
        elif tag == "form":
            self.form = attributes


def _consent_form(emu: PapertrailEmulator, params: dict[str, str]) -> _FormParser:
    response = requests.get(emu.authorize_url, params=params, timeout=TIMEOUT, allow_redirects=False)
    assert response.status_code == 200, response.text
    parser = _FormParser()
    parser.feed(response.text)
    return parser


def _submit(emu: PapertrailEmulator, fields: dict[str, str], decision: str) -> requests.Response:
    return requests.post(
        emu.authorize_url, data={**fields, "decision": decision}, timeout=TIMEOUT, allow_redirects=False
    )


def _token(emu: PapertrailEmulator, form: dict[str, str], *, auth: str = "post", **kwargs: Any) -> requests.Response:
    headers: dict[str, str] = {}
    data = dict(form)
    if auth == "post":
        data.update(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    elif auth == "basic":
        raw = f"{quote(CLIENT_ID, safe='')}:{quote(CLIENT_SECRET, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(raw.encode()).decode()
    return requests.post(emu.token_url, data=data, headers=headers, timeout=kwargs.pop("timeout", TIMEOUT), **kwargs)


def _exchange(emu: PapertrailEmulator, code: str, **extra: str) -> requests.Response:
    return _token(emu, {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, **extra})


def _refresh(emu: PapertrailEmulator, refresh_token: str, **kwargs: Any) -> requests.Response:
    return _token(emu, {"grant_type": "refresh_token", "refresh_token": refresh_token}, **kwargs)


def _tokens(emu: PapertrailEmulator, scope: str = "bank gl") -> dict[str, Any]:
    code = emu.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT, scope=scope)
    response = _exchange(emu, code)
    assert response.status_code == 200, response.text
    return response.json()


def _api(
    emu: PapertrailEmulator, module: str, token: str | None, *, method: str = "GET", **kwargs: Any
) -> requests.Response:
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(
        method, emu.api_url(module), headers=headers, timeout=kwargs.pop("timeout", TIMEOUT), **kwargs
    )


def _pkce() -> tuple[str, str]:
    verifier = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def _query(location: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(location).query)


# -- consent page -------------------------------------------------------------------------
def test_consent_page_renders_form_and_escapes_everything(emu: PapertrailEmulator) -> None:
    hostile_scope = '<script>alert("x")</script>'
    hostile_state = '"><img src=x onerror=alert(1)>'
    response = requests.get(
        emu.authorize_url,
        params=_authorize_params(scope=hostile_scope, state=hostile_state, system="sage_uk"),
        timeout=TIMEOUT,
        allow_redirects=False,
    )
    assert response.status_code == 200
    page = response.text
    assert "<script" not in page.lower()
    assert "<img" not in page
    assert "&lt;script&gt;" in page
    assert "&quot;&gt;&lt;img" in page
    assert f'<strong id="client-id">{CLIENT_ID}</strong>' in page
    assert '<strong id="system">sage_uk</strong>' in page
    assert '<button type="submit" name="decision" value="allow" id="allow">Allow</button>' in page
    assert '<button type="submit" name="decision" value="deny" id="deny">Deny</button>' in page
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["X-Frame-Options"] == "DENY"
    parser = _FormParser()
    parser.feed(page)
    assert parser.form == {"method": "post", "action": "/api/authorize.php"}
    # Nothing is loaded from anywhere: no script, img, link or any src/href attribute.
    assert {tag for tag, _ in parser.tags} <= {
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "main",
        "h1",
        "p",
        "strong",
        "code",
        "form",
        "input",
        "button",
    }
    assert not any({"src", "href"} & attrs.keys() for _, attrs in parser.tags)
    assert parser.hidden["state"] == hostile_state  # round-trips intact once unescaped
    assert parser.hidden["scope"] == hostile_scope


@pytest.mark.parametrize(
    "redirect_uri",
    [
        REDIRECT + "/",
        REDIRECT + "?x=1",
        REDIRECT.replace("8765", "8766"),
        REDIRECT.replace("http://", "https://"),
        REDIRECT.upper(),
        OTHER_REDIRECT,  # registered, but for another client
        "https://evil.example/steal",
        "",
    ],
)
def test_unregistered_redirect_uri_is_refused_without_redirect(emu: PapertrailEmulator, redirect_uri: str) -> None:
    get = requests.get(
        emu.authorize_url, params=_authorize_params(redirect_uri=redirect_uri), timeout=TIMEOUT, allow_redirects=False
    )
    post = _submit(emu, _authorize_params(redirect_uri=redirect_uri), "allow")
    for response in (get, post):
        assert response.status_code == 400
        assert "Location" not in response.headers
        assert "not registered" in response.text
    assert emu.stats["codes_issued"] == 0


def test_unknown_client_is_refused_without_redirect(emu: PapertrailEmulator) -> None:
    response = requests.get(
        emu.authorize_url, params=_authorize_params(client_id="nobody"), timeout=TIMEOUT, allow_redirects=False
    )
    assert response.status_code == 400
    assert "Location" not in response.headers
    assert "Unknown client_id" in response.text


@pytest.mark.parametrize(
    ("overrides", "error", "fragment"),
    [
        ({"system": "sap"}, "invalid_request", "system"),
        ({"system": None}, "invalid_request", "system"),
        ({"response_type": "token"}, "unsupported_response_type", "response_type"),
        ({"response_type": None}, "invalid_request", "response_type"),
        ({"code_challenge": "a" * 43, "code_challenge_method": "plain"}, "invalid_request", "S256"),
        ({"code_challenge": "a" * 43}, "invalid_request", "S256"),
        ({"code_challenge": "short", "code_challenge_method": "S256"}, "invalid_request", "code_challenge"),
    ],
)
def test_invalid_authorization_request_redirects_with_error(
    emu: PapertrailEmulator, overrides: dict[str, str | None], error: str, fragment: str
) -> None:
    params = _authorize_params(**overrides)
    response = requests.get(emu.authorize_url, params=params, timeout=TIMEOUT, allow_redirects=False)
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith(REDIRECT + "?")
    query = _query(location)
    assert query["error"] == [error]
    assert fragment in query["error_description"][0]
    assert query["state"] == [params["state"]]
    assert "code" not in query


def test_allow_redirects_with_code_state_and_iss(emu: PapertrailEmulator) -> None:
    params = _authorize_params()
    form = _consent_form(emu, params)
    assert {b["id"] for b in form.buttons} == {"allow", "deny"}
    response = _submit(emu, form.hidden, "allow")
    assert response.status_code == 302
    assert response.headers["Cache-Control"] == "no-store"
    location = response.headers["Location"]
    assert location.startswith(REDIRECT + "?code=")
    query = _query(location)
    assert query["state"] == [params["state"]]
    assert query["iss"] == [emu.base_url]
    (code,) = query["code"]
    assert len(code) >= 43
    assert code in emu.issued_secrets
    assert emu.stats["consents_allowed"] == 1
    tokens = _exchange(emu, code)
    assert tokens.status_code == 200
    assert tokens.json()["scope"] == "bank gl"


def test_deny_redirects_with_access_denied(emu: PapertrailEmulator) -> None:
    params = _authorize_params()
    response = _submit(emu, _consent_form(emu, params).hidden, "deny")
    assert response.status_code == 302
    location = response.headers["Location"]
    assert "error=access_denied&error_description=The+user+denied+access&state=" in location
    query = _query(location)
    assert query["error"] == ["access_denied"]
    assert query["state"] == [params["state"]]
    assert "code" not in query
    assert emu.stats["consents_denied"] == 1
    assert emu.stats["codes_issued"] == 0


def test_redirect_keeps_existing_query_string(emu: PapertrailEmulator) -> None:
    params = _authorize_params(redirect_uri=REDIRECT_WITH_QUERY)
    response = _submit(emu, _consent_form(emu, params).hidden, "allow")
    location = response.headers["Location"]
    assert location.startswith(REDIRECT_WITH_QUERY + "&code=")
    assert _query(location)["tenant"] == ["acme"]


def test_consent_post_needs_a_decision(emu: PapertrailEmulator) -> None:
    response = _submit(emu, _authorize_params(), "maybe")
    assert response.status_code == 400
    assert "Location" not in response.headers
    assert emu.stats["codes_issued"] == 0


# -- token endpoint: authorization code ---------------------------------------------------
def test_code_exchange_with_client_secret_post(emu: PapertrailEmulator) -> None:
    code = emu.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT, scope="bank", system="quickbooks")
    response = _exchange(emu, code)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Pragma"] == "no-cache"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["scope"] == "bank"
    assert body["x_papertrail_org_id"].startswith("org_")
    assert {body["access_token"], body["refresh_token"]} <= emu.issued_secrets
    assert body["access_token"] != body["refresh_token"]
    assert emu.stats["authorization_code_grants"] == 1
    assert emu.grant_is_active(body["refresh_token"])
    assert _api(emu, "company", body["access_token"], params={"system": "quickbooks", "query": "co_details"}).ok


def test_code_exchange_with_client_secret_basic_form_encodes_credentials(emu: PapertrailEmulator) -> None:
    code = emu.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT)
    response = _token(emu, {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}, auth="basic")
    assert response.status_code == 200, response.text
    # Without the form-urlencoding step, '+' decodes to a space: the secret does not match.
    raw = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    code2 = emu.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT)
    unencoded = requests.post(
        emu.token_url,
        data={"grant_type": "authorization_code", "code": code2, "redirect_uri": REDIRECT},
        headers={"Authorization": f"Basic {raw}"},
        timeout=TIMEOUT,
    )
    assert unencoded.status_code == 401
    assert unencoded.json()["error"] == "invalid_client"


def test_both_client_authentication_methods_at_once_is_invalid_request(emu: PapertrailEmulator) -> None:
    code = emu.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT)
    raw = f"{quote(CLIENT_ID, safe='')}:{quote(CLIENT_SECRET, safe='')}"
    response = requests.post(
        emu.token_url,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
        headers={"Authorization": "Basic " + base64.b64encode(raw.encode()).decode()},
        timeout=TIMEOUT,
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


@pytest.mark.parametrize(
    ("data", "headers"),
    [
        ({"client_id": CLIENT_ID, "client_secret": "wrong"}, {}),
        ({"client_id": "nobody", "client_secret": CLIENT_SECRET}, {}),
        ({"client_id": CLIENT_ID}, {}),
        ({}, {}),
        ({}, {"Authorization": "Basic " + base64.b64encode(f"{CLIENT_ID}:wrong".encode()).decode()}),
        ({}, {"Authorization": "Basic !!!not-base64"}),
        ({}, {"Authorization": "Bearer something"}),
    ],
)
def test_bad_client_authentication_is_401_invalid_client(
    emu: PapertrailEmulator, data: dict[str, str], headers: dict[str, str]
) -> None:
    code = emu.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT)
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, **data}
    response = requests.post(emu.token_url, data=form, headers=headers, timeout=TIMEOUT)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert response.headers["WWW-Authenticate"] == 'Basic realm="papertrail"'
    assert response.headers["Cache-Control"] == "no-store"
    # The code was not spent by an unauthenticated request.
    assert _exchange(emu, code).status_code == 200


def test_code_is_single_use_and_reuse_revokes_its_tokens(emu: PapertrailEmulator) -> None:
    code = emu.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT)
    first = _exchange(emu, code).json()
    params = {"system": "xero", "query": "co_details"}
    assert _api(emu, "company", first["access_token"], params=params).status_code == 200
    second = _exchange(emu, code)
    assert second.status_code == 400
    assert second.json()["error"] == "invalid_grant"
    assert emu.stats["grants_revoked"] == 1
    assert not emu.grant_is_active(first["access_token"])
    assert _api(emu, "company", first["access_token"], params=params).status_code == 401
    assert _refresh(emu, first["refresh_token"]).json()["error"] == "invalid_grant"


@pytest.mark.parametrize("case", ["redirect_mismatch", "redirect_missing", "other_client", "unknown"])
def test_code_exchange_invalid_grant_cases(emu: PapertrailEmulator, case: str) -> None:
    code = emu.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT)
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
    if case == "redirect_mismatch":
        form["redirect_uri"] = REDIRECT_WITH_QUERY  # registered too, but not the one used
    elif case == "redirect_missing":
        del form["redirect_uri"]
    elif case == "unknown":
        form["code"] = "not-a-code"
    if case == "other_client":
        form.update(client_id=OTHER_ID, client_secret=OTHER_SECRET, redirect_uri=OTHER_REDIRECT)
        response = requests.post(emu.token_url, data=form, timeout=TIMEOUT)
    else:
        response = _token(emu, form)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert emu.stats["authorization_code_grants"] == 0


def test_expired_code_is_invalid_grant(clocked: PapertrailEmulator, clock: FakeClock) -> None:
    code = clocked.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT)
    clock.now += 31
    response = _exchange(clocked, code)
    assert response.status_code == 400
    assert "expired" in response.json()["error_description"]


def test_pkce_s256_round_trip(emu: PapertrailEmulator) -> None:
    verifier, challenge = _pkce()
    params = _authorize_params(code_challenge=challenge, code_challenge_method="S256")
    form = _consent_form(emu, params)
    assert form.hidden["code_challenge"] == challenge
    location = _submit(emu, form.hidden, "allow").headers["Location"]
    code = _query(location)["code"][0]
    response = _exchange(emu, code, code_verifier=verifier)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("verifier", ["wrong", None, "A" * 43])
def test_pkce_wrong_or_missing_verifier_is_invalid_grant(emu: PapertrailEmulator, verifier: str | None) -> None:
    _, challenge = _pkce()
    code = emu.issue_code(
        client_id=CLIENT_ID, redirect_uri=REDIRECT, code_challenge=challenge, code_challenge_method="S256"
    )
    extra = {"code_verifier": verifier} if verifier is not None else {}
    response = _exchange(emu, code, **extra)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_verifier_without_challenge_is_refused(emu: PapertrailEmulator) -> None:
    verifier, _ = _pkce()
    code = emu.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT)
    response = _exchange(emu, code, code_verifier=verifier)
    assert response.json()["error"] == "invalid_grant"


def test_require_pkce() -> None:
    with _run(require_pkce=True) as emu:
        response = requests.get(emu.authorize_url, params=_authorize_params(), timeout=TIMEOUT, allow_redirects=False)
        assert response.status_code == 302
        assert _query(response.headers["Location"])["error"] == ["invalid_request"]
        with pytest.raises(ValueError, match="PKCE"):
            emu.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT)
        _, challenge = _pkce()
        assert emu.issue_code(
            client_id=CLIENT_ID, redirect_uri=REDIRECT, code_challenge=challenge, code_challenge_method="S256"
        )


def test_issue_code_validates_like_the_consent_page(emu: PapertrailEmulator) -> None:
    with pytest.raises(ValueError, match="redirect_uri"):
        emu.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT + "/")
    with pytest.raises(ValueError, match="client_id"):
        emu.issue_code(client_id="nobody", redirect_uri=REDIRECT)
    with pytest.raises(ValueError, match="system"):
        emu.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT, system="sap")
    with pytest.raises(ValueError, match="S256"):
        emu.issue_code(
            client_id=CLIENT_ID, redirect_uri=REDIRECT, code_challenge="a" * 43, code_challenge_method="plain"
        )


# -- token endpoint: refresh --------------------------------------------------------------
def test_refresh_rotates_and_reuse_revokes_the_whole_grant(emu: PapertrailEmulator) -> None:
    first = _tokens(emu)
    second = _refresh(emu, first["refresh_token"]).json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] in emu.issued_secrets
    third = _refresh(emu, second["refresh_token"]).json()
    assert emu.stats["refresh_grants"] == 2
    # Replaying a rotated token: refused, and every token of the grant dies with it.
    replay = _refresh(emu, first["refresh_token"])
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"
    assert emu.stats["grants_revoked"] == 1
    assert not emu.grant_is_active(third["refresh_token"])
    assert _refresh(emu, third["refresh_token"]).json()["error"] == "invalid_grant"
    params = {"system": "xero", "query": "co_details"}
    assert _api(emu, "company", third["access_token"], params=params).status_code == 401


def test_refresh_without_rotation_keeps_the_same_token() -> None:
    with _run(rotate_refresh_tokens=False) as emu:
        first = _tokens(emu)
        for _ in range(3):
            response = _refresh(emu, first["refresh_token"])
            assert response.status_code == 200
            assert "refresh_token" not in response.json()  # the client must keep its own
        assert emu.stats["refresh_grants"] == 3
        assert emu.grant_is_active(first["refresh_token"])


def test_reuse_without_revocation_only_refuses_the_old_token() -> None:
    with _run(revoke_on_refresh_reuse=False) as emu:
        first = _tokens(emu)
        second = _refresh(emu, first["refresh_token"]).json()
        assert _refresh(emu, first["refresh_token"]).json()["error"] == "invalid_grant"
        assert emu.stats["grants_revoked"] == 0
        assert _refresh(emu, second["refresh_token"]).status_code == 200


DAY = 86_400


def test_idle_refresh_token_expires_on_the_emulator_clock(clock: FakeClock) -> None:
    """Xero-like idle expiry: a refresh token unused for longer than the idle TTL is refused;
    presenting it in time issues a new one whose idle time starts again."""
    with _run(clock=clock, refresh_token_idle_ttl=60 * DAY) as emu:
        first = _tokens(emu)
        clock.now += 59 * DAY
        second = _refresh(emu, first["refresh_token"])
        assert second.status_code == 200, second.text
        assert "refresh_token_expires_in" not in second.json()  # idle expiry is not stated
        clock.now += 59 * DAY  # 118 days after consent, 59 since the last refresh: still alive
        third = _refresh(emu, second.json()["refresh_token"])
        assert third.status_code == 200
        clock.now += 60 * DAY + 1
        dead = _refresh(emu, third.json()["refresh_token"])
        assert dead.status_code == 400
        assert dead.json()["error"] == "invalid_grant"
        assert "unused" in dead.json()["error_description"]
        assert emu.stats["refresh_tokens_expired"] == 1
        assert emu.stats["grants_revoked"] == 0  # expired, not revoked: the access token still works
        assert emu.stats["refresh_grants"] == 2


def test_idle_expiry_without_rotation_counts_from_the_last_use(clock: FakeClock) -> None:
    with _run(clock=clock, refresh_token_idle_ttl=100 * DAY, rotate_refresh_tokens=False) as emu:
        first = _tokens(emu)
        for _ in range(3):  # 270 days in all, never 100 in a row unused
            clock.now += 90 * DAY
            assert _refresh(emu, first["refresh_token"]).status_code == 200
        clock.now += 100 * DAY + 1
        assert _refresh(emu, first["refresh_token"]).json()["error"] == "invalid_grant"
        assert emu.stats["refresh_tokens_expired"] == 1


def test_refresh_token_ttl_is_stated_and_enforced(clock: FakeClock) -> None:
    with _run(clock=clock, refresh_token_ttl=30 * DAY, refresh_token_member="x_refresh_token_expires_in") as emu:
        first = _tokens(emu)
        assert first["x_refresh_token_expires_in"] == 30 * DAY
        clock.now += 30 * DAY
        second = _refresh(emu, first["refresh_token"]).json()  # exactly at its lifetime: still valid
        assert second["x_refresh_token_expires_in"] == 30 * DAY  # each rotated token states its own
        clock.now += 30 * DAY + 1
        expired = _refresh(emu, second["refresh_token"])
        assert (expired.status_code, expired.json()["error"]) == (400, "invalid_grant")
        assert expired.json()["error_description"] == "the refresh token has expired"
        assert emu.stats["refresh_tokens_expired"] == 1


def test_ttls_must_be_positive() -> None:
    for kwargs in ({"refresh_token_ttl": 0}, {"refresh_token_idle_ttl": -1}):
        with pytest.raises(ValueError, match="must be positive"):
            PapertrailEmulator(**kwargs)


def test_revoke_grant_and_every_grant_of_a_client(emu: PapertrailEmulator) -> None:
    params = {"system": "xero", "query": "co_details"}
    one, two = _tokens(emu), _tokens(emu)
    code = emu.issue_code(client_id=OTHER_ID, redirect_uri=OTHER_REDIRECT, scope="bank")
    response = requests.post(
        emu.token_url,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": OTHER_REDIRECT,
            "client_id": OTHER_ID,
            "client_secret": OTHER_SECRET,
        },
        timeout=TIMEOUT,
    )
    other = response.json()
    assert emu.revoke_grant(one["refresh_token"]) is True
    assert emu.revoke_grant(one["access_token"]) is False  # already revoked
    refused = _refresh(emu, one["refresh_token"])
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")
    assert _api(emu, "company", one["access_token"], params=params).status_code == 401
    assert _api(emu, "company", two["access_token"], params=params).status_code == 200
    assert emu.revoke_client_grants(CLIENT_ID) == 1  # only `two` was still alive
    assert _refresh(emu, two["refresh_token"]).json()["error"] == "invalid_grant"
    assert _api(emu, "company", two["access_token"], params=params).status_code == 401
    assert emu.grant_is_active(other["refresh_token"])  # another client's grant is untouched
    assert emu.stats["grants_revoked"] == 2


def test_concurrent_refreshes_of_one_token_kill_the_grant(emu: PapertrailEmulator) -> None:
    """Why clients must serialize refreshes: parallel use of one refresh token is reuse."""
    first = _tokens(emu)
    barrier = threading.Barrier(6)
    statuses: list[int] = []

    def worker() -> None:
        barrier.wait()
        statuses.append(_refresh(emu, first["refresh_token"]).status_code)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert sorted(statuses) == [200, 400, 400, 400, 400, 400]
    assert emu.stats["refresh_grants"] == 1
    assert emu.stats["grants_revoked"] == 1
    assert not emu.grant_is_active(first["refresh_token"])


def test_refresh_scope_must_be_a_subset(emu: PapertrailEmulator) -> None:
    first = _tokens(emu, scope="bank gl")
    narrower = _token(emu, {"grant_type": "refresh_token", "refresh_token": first["refresh_token"], "scope": "gl"})
    assert narrower.status_code == 200
    assert narrower.json()["scope"] == "gl"
    wider = _token(
        emu, {"grant_type": "refresh_token", "refresh_token": narrower.json()["refresh_token"], "scope": "gl reports"}
    )
    assert wider.status_code == 400
    assert wider.json()["error"] == "invalid_scope"


def test_refresh_with_unknown_token_or_another_client(emu: PapertrailEmulator) -> None:
    first = _tokens(emu)
    assert _refresh(emu, "unknown-refresh-token").json()["error"] == "invalid_grant"
    stolen = requests.post(
        emu.token_url,
        data={
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "client_id": OTHER_ID,
            "client_secret": OTHER_SECRET,
        },
        timeout=TIMEOUT,
    )
    assert stolen.json()["error"] == "invalid_grant"
    assert emu.grant_is_active(first["refresh_token"])


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({"grant_type": "password", "username": "u", "password": "p"}, "unsupported_grant_type"),
        ({"grant_type": "client_credentials"}, "unsupported_grant_type"),
        ({}, "invalid_request"),
        ({"grant_type": "refresh_token"}, "invalid_request"),
        ({"grant_type": "authorization_code", "redirect_uri": REDIRECT}, "invalid_request"),
    ],
)
def test_token_request_errors(emu: PapertrailEmulator, form: dict[str, str], error: str) -> None:
    response = _token(emu, form)
    assert response.status_code == 400
    assert response.json()["error"] == error


def test_token_endpoint_transport_rules(emu: PapertrailEmulator) -> None:
    assert requests.get(emu.token_url, timeout=TIMEOUT).status_code == 405
    as_json = requests.post(
        emu.token_url,
        json={"grant_type": "refresh_token", "refresh_token": "x", "client_id": CLIENT_ID, "client_secret": "y"},
        timeout=TIMEOUT,
    )
    assert as_json.json()["error"] == "invalid_request"
    repeated = requests.post(
        emu.token_url,
        data=[("grant_type", "refresh_token"), ("refresh_token", "a"), ("refresh_token", "b")],
        timeout=TIMEOUT,
    )
    assert repeated.json()["error"] == "invalid_request"
    in_url = requests.post(emu.token_url + "?client_secret=not-the-real-one", data={}, timeout=TIMEOUT)
    assert in_url.status_code == 400
    assert "URL" in in_url.json()["error_description"]


# -- fault injection ----------------------------------------------------------------------
def test_injected_429_with_retry_after_does_not_spend_the_code(emu: PapertrailEmulator) -> None:
    code = emu.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT)
    emu.inject("token", status=429, retry_after=7)
    limited = _exchange(emu, code)
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "7"
    assert limited.json()["error"] == "temporarily_unavailable"
    assert limited.headers["Cache-Control"] == "no-store"
    assert emu.stats["faults_served"] == 1
    assert emu.pending_faults() == 0
    assert _exchange(emu, code).status_code == 200


def test_retry_after_alone_implies_429(emu: PapertrailEmulator) -> None:
    emu.inject("token", retry_after=3)
    response = _refresh(emu, "whatever")
    assert (response.status_code, response.headers["Retry-After"]) == (429, "3")


def test_injected_500_and_custom_bodies_on_the_api(emu: PapertrailEmulator) -> None:
    token = _tokens(emu)["access_token"]
    params = {"system": "xero", "query": "co_details"}
    emu.inject("api", status=500)
    emu.inject("api", status=503, body={"error": "maintenance", "until": "soon"})
    emu.inject("api", status=502, body="<html><body>Bad gateway</body></html>")
    first = _api(emu, "company", token, params=params)
    assert (first.status_code, first.json()["error"]) == (500, "server_error")
    second = _api(emu, "company", token, params=params)
    assert (second.status_code, second.json()) == (503, {"error": "maintenance", "until": "soon"})
    third = _api(emu, "company", token, params=params)
    assert third.status_code == 502
    assert third.headers["Content-Type"].startswith("text/html")
    assert "Bad gateway" in third.text
    assert _api(emu, "company", token, params=params).status_code == 200
    assert emu.stats["faults_served"] == 3


def test_faults_are_fifo_and_honour_times(emu: PapertrailEmulator) -> None:
    emu.inject("token", status=503, times=2)
    emu.inject("token", status=500)
    assert emu.pending_faults("token") == 3
    assert emu.pending_faults("api") == 0
    seen = [_refresh(emu, "not-a-token").status_code for _ in range(4)]
    assert seen == [503, 503, 500, 400]


def test_drop_closes_without_response_and_processes_nothing(emu: PapertrailEmulator) -> None:
    first = _tokens(emu)
    emu.inject("token", drop=True)
    with pytest.raises(requests.ConnectionError):
        _refresh(emu, first["refresh_token"])
    assert emu.stats["refresh_grants"] == 0
    # Nothing happened server side: the same refresh token still works.
    assert _refresh(emu, first["refresh_token"]).status_code == 200


def test_drop_after_processing_loses_the_rotated_refresh_token(emu: PapertrailEmulator) -> None:
    """The dangerous case: the server rotated, the client never heard about it."""
    first = _tokens(emu)
    emu.inject("token", drop_after_processing=True)
    with pytest.raises(requests.ConnectionError):
        _refresh(emu, first["refresh_token"])
    assert emu.stats["refresh_grants"] == 1
    # A naive retry with the token the client still holds is reuse: the grant dies.
    retry = _refresh(emu, first["refresh_token"])
    assert retry.json()["error"] == "invalid_grant"
    assert not emu.grant_is_active(first["refresh_token"])
    assert emu.stats["grants_revoked"] == 1


def test_drop_after_processing_on_a_write_records_it(emu: PapertrailEmulator) -> None:
    token = _tokens(emu)["access_token"]
    params = {"system": "xero", "query": "create_invoice"}
    emu.inject("api", drop_after_processing=True)
    with pytest.raises(requests.ConnectionError):
        _api(emu, "customers", token, method="POST", params=params, json={"amount": "10.00"})
    assert _api(emu, "customers", token, method="POST", params=params, json={"amount": "10.00"}).status_code == 201
    assert emu.stats["writes"] == 2  # a blind retry duplicated the invoice
    assert [w["payload"] for w in emu.writes] == [{"amount": "10.00"}] * 2


def test_delay_makes_the_client_time_out(emu: PapertrailEmulator) -> None:
    token = _tokens(emu)["access_token"]
    params = {"system": "xero", "query": "co_details"}
    emu.inject("api", delay=2.0)
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        _api(emu, "company", token, params=params, timeout=0.3)
    assert time.monotonic() - started < 1.5
    fast = _api(emu, "company", token, params=params)
    assert fast.status_code == 200


def test_authorize_fault_and_drop(emu: PapertrailEmulator) -> None:
    emu.inject("authorize", status=503, retry_after=30)
    emu.inject("authorize", drop=True)
    unavailable = requests.get(emu.authorize_url, params=_authorize_params(), timeout=TIMEOUT, allow_redirects=False)
    assert unavailable.status_code == 503
    assert unavailable.headers["Retry-After"] == "30"
    assert unavailable.headers["Content-Type"].startswith("text/html")
    with pytest.raises(requests.ConnectionError):
        requests.get(emu.authorize_url, params=_authorize_params(), timeout=TIMEOUT)
    assert requests.get(emu.authorize_url, params=_authorize_params(), timeout=TIMEOUT).status_code == 200


@pytest.mark.parametrize(
    "kwargs",
    [
        {"endpoint": "tokens", "status": 500},
        {"endpoint": "token", "status": 500, "drop": True},
        {"endpoint": "token", "drop": True, "drop_after_processing": True},
        {"endpoint": "token"},
        {"endpoint": "token", "status": 500, "times": 0},
        {"endpoint": "token", "status": 99},
        {"endpoint": "token", "body": {"error": "x"}},
    ],
)
def test_inject_rejects_meaningless_faults(emu: PapertrailEmulator, kwargs: dict[str, Any]) -> None:
    endpoint = kwargs.pop("endpoint")
    with pytest.raises(ValueError):
        emu.inject(endpoint, **kwargs)
    assert emu.pending_faults() == 0


# -- data modules -------------------------------------------------------------------------
def test_modules_table_is_the_documented_one() -> None:
    assert MODULES == {
        "bank": ("bank_list", "bank_accounts_list"),
        "customers": (
            "list_customers",
            "list_invoices",
            "invoice_detail",
            "create_customer",
            "create_invoice",
            "create_credit_note",
        ),
        "vendors": ("list_vendors", "list_invoices", "create_vendor", "create_invoice"),
        "gl": ("list_gl_transaction", "list_gl_accounts"),
        "accounts": ("account_create", "account_update", "account_delete"),
        "reports": ("trial_balance", "income_statement", "balance_sheet", "cash_flow"),
        "company": ("co_details", "users"),
    }
    assert set(SYSTEMS) == {
        "freeagent",
        "freshbooks",
        "quickbooks",
        "sage_sa",
        "sage_uk",
        "xero",
        "zoho",
        "wave",
        "syspro",
    }


@pytest.mark.parametrize("authorization", [None, "Basic abc", "Bearer", "Bearer not-a-token", "bearer  "])
def test_api_bearer_required(emu: PapertrailEmulator, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = _api(emu, "bank", None, params={"system": "xero", "query": "bank_list"}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


def test_api_expired_and_revoked_tokens_are_401(clocked: PapertrailEmulator, clock: FakeClock) -> None:
    params = {"system": "xero", "query": "co_details"}
    tokens = _tokens(clocked)
    assert _api(clocked, "company", tokens["access_token"], params=params).status_code == 200
    clock.now += 61
    assert _api(clocked, "company", tokens["access_token"], params=params).status_code == 401
    fresh = _refresh(clocked, tokens["refresh_token"]).json()
    assert fresh["expires_in"] == 60
    assert _api(clocked, "company", fresh["access_token"], params=params).status_code == 200
    assert clocked.expire_access_tokens() == 1
    assert _api(clocked, "company", fresh["access_token"], params=params).status_code == 401
    newest = _refresh(clocked, fresh["refresh_token"]).json()
    assert clocked.revoke_grant(newest["access_token"]) is True
    assert _api(clocked, "company", newest["access_token"], params=params).status_code == 401
    assert clocked.stats["invalid_token_errors"] == 3


def test_api_parameter_errors(emu: PapertrailEmulator) -> None:
    token = _tokens(emu)["access_token"]
    unknown_query = _api(emu, "bank", token, params={"system": "xero", "query": "list_customers"})
    assert unknown_query.status_code == 400
    assert unknown_query.json()["error"] == "invalid_query"
    assert unknown_query.json()["valid"] == ["bank_list", "bank_accounts_list"]
    missing_query = _api(emu, "gl", token, params={"system": "xero"})
    assert missing_query.json()["valid"] == list(MODULES["gl"])
    bad_system = _api(emu, "bank", token, params={"system": "sap", "query": "bank_list"})
    assert (bad_system.status_code, bad_system.json()["error"]) == (400, "invalid_system")
    assert _api(emu, "bank", token, params={"query": "bank_list"}).status_code == 400
    unknown_module = _api(emu, "employees", token, params={"system": "xero", "query": "list"})
    assert unknown_module.status_code == 404
    for count in ("-1", "many"):
        bad_count = _api(emu, "bank", token, params={"system": "xero", "query": "bank_list", "count": count})
        assert bad_count.status_code == 400
    in_url = _api(emu, "bank", None, params={"system": "xero", "query": "bank_list", "access_token": "not-real"})
    assert in_url.status_code == 400


def test_list_reads_are_deterministic_with_default_count(emu: PapertrailEmulator) -> None:
    token = _tokens(emu)["access_token"]
    params = {"system": "sage_uk", "query": "bank_list"}
    first = _api(emu, "bank", token, params=params)
    assert first.status_code == 200
    body = first.json()
    assert {k: body[k] for k in ("status", "module", "query", "system", "count")} == {
        "status": "ok",
        "module": "bank",
        "query": "bank_list",
        "system": "sage_uk",
        "count": 25,
    }
    assert len(body["data"]) == 25
    assert [r["id"] for r in body["data"][:2]] == ["BT-000001", "BT-000002"]
    record = body["data"][0]
    assert {"id", "date", "amount", "currency", "description"} <= record.keys()
    assert record["date"] == "2024-01-01"
    assert record["currency"] == "GBP"
    assert _api(emu, "bank", token, params=params).json() == body


def test_every_read_query_answers(emu: PapertrailEmulator) -> None:
    token = _tokens(emu)["access_token"]
    for module, queries in MODULES.items():
        for query in queries:
            if query.startswith(("create_", "account_")):
                continue
            response = _api(emu, module, token, params={"system": "zoho", "query": query, "count": "3"})
            assert response.status_code == 200, (module, query)
            data = response.json()["data"]
            if query.startswith("list_") or query in ("bank_list", "bank_accounts_list", "users"):
                assert len(data) == 3, (module, query)
                assert len({r["id"] for r in data}) == 3
            else:
                assert isinstance(data, dict) and data, (module, query)
    detail = _api(emu, "customers", token, params={"system": "xero", "query": "invoice_detail", "id": "SI-000042"})
    assert detail.json()["data"]["id"] == "SI-000042"
    balance = _api(emu, "reports", token, params={"system": "xero", "query": "trial_balance"}).json()["data"]
    assert balance["totals"]["debit"] == balance["totals"]["credit"]


def test_large_list_is_streamed_in_chunks(emu: PapertrailEmulator) -> None:
    token = _tokens(emu)["access_token"]
    response = _api(
        emu, "gl", token, params={"system": "xero", "query": "list_gl_transaction", "count": "100000"}, stream=True
    )
    assert response.status_code == 200
    assert response.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in response.headers
    pieces = 0
    buffer = bytearray()
    for piece in response.iter_content(chunk_size=None):
        pieces += 1
        buffer += piece
    assert pieces > 10
    body = json.loads(buffer)
    assert body["count"] == 100_000
    assert len(body["data"]) == 100_000
    assert body["data"][-1]["id"] == "GL-100000"
    assert emu.stats["records_streamed"] == 100_000


def test_huge_list_starts_streaming_before_it_is_built(emu: PapertrailEmulator) -> None:
    """10 million records asked, capped at 5 million, first bytes arrive at once."""
    token = _tokens(emu)["access_token"]
    started = time.monotonic()
    response = _api(
        emu, "bank", token, params={"system": "xero", "query": "bank_list", "count": "10000000"}, stream=True
    )
    first = next(response.iter_content(chunk_size=4096))
    elapsed = time.monotonic() - started
    response.close()
    assert first.startswith(b'{"status":"ok","module":"bank","query":"bank_list","system":"xero","count":5000000,')
    # Building ~750 MB of JSON before answering would take far longer than this.
    assert elapsed < 5.0
    # The server survives the client walking away mid-stream.
    assert _api(emu, "bank", token, params={"system": "xero", "query": "bank_list", "count": "1"}).ok


def test_writes_are_counted_and_recorded(emu: PapertrailEmulator) -> None:
    token = _tokens(emu)["access_token"]
    payload = {"customer_id": "CU-000001", "lines": [{"amount": "12.34"}]}
    params = {"system": "xero", "query": "create_invoice"}
    answers = [
        _api(emu, "customers", token, method="POST", params=params, json=payload, headers={"Idempotency-Key": "k-1"})
        for _ in range(2)
    ]
    assert [a.status_code for a in answers] == [201, 201]
    ids = [a.json()["data"]["id"] for a in answers]
    assert ids[0] != ids[1]
    assert all(a.json()["status"] == "ok" for a in answers)
    assert answers[0].json()["data"]["lines"] == payload["lines"]
    update = _api(
        emu, "accounts", token, method="POST", params={"system": "xero", "query": "account_update"}, json={"id": "GA-7"}
    )
    assert update.json()["data"]["id"] == "GA-7"
    assert emu.stats["writes"] == 3
    writes = emu.writes
    assert [w["query"] for w in writes] == ["create_invoice", "create_invoice", "account_update"]
    assert sum(1 for w in writes if w["payload"] == payload) == 2
    assert writes[0]["idempotency_key"] == "k-1"
    assert writes[0]["module"] == "customers" and writes[0]["system"] == "xero"


def test_write_body_and_method_errors(emu: PapertrailEmulator) -> None:
    token = _tokens(emu)["access_token"]
    params = {"system": "xero", "query": "create_customer"}
    bad_json = _api(
        emu, "customers", token, method="POST", params=params, data=b"{nope",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert bad_json.status_code == 400
    array = _api(emu, "customers", token, method="POST", params=params, json=[1, 2])
    assert array.status_code == 400
    form = _api(emu, "customers", token, method="POST", params=params, data={"a": "b"})
    assert form.status_code == 415
    assert _api(emu, "customers", token, params=params).status_code == 405
    read_by_post = _api(emu, "bank", token, method="POST", params={"system": "xero", "query": "bank_list"}, json={})
    assert read_by_post.status_code == 405
    assert emu.stats["writes"] == 0
    assert emu.writes == []


# -- TLS ----------------------------------------------------------------------------------
def test_tls_verifies_against_the_emulator_ca_only() -> None:
    with _run(tls=True) as emu:
        assert emu.base_url.startswith("https://127.0.0.1:")
        ca = emu.ca_cert_path
        assert ca is not None and Path(ca).is_file()
        ok = requests.get(emu.authorize_url, params=_authorize_params(), verify=ca, timeout=TIMEOUT)
        assert ok.status_code == 200
        by_name = requests.get(emu.base_url.replace("127.0.0.1", "localhost") + "/healthz", verify=ca, timeout=TIMEOUT)
        assert by_name.json() == {"status": "ok"}
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(emu.authorize_url, params=_authorize_params(), timeout=TIMEOUT)
        code = emu.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT)
        exchanged = requests.post(
            emu.token_url,
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
            },
            verify=ca,
            timeout=TIMEOUT,
        )
        assert exchanged.status_code == 200
    assert not Path(ca).exists()
    assert emu.ca_cert_path is None


# -- lifecycle, logging, CLI ----------------------------------------------------------------
def test_restart_keeps_port_and_state(emu: PapertrailEmulator) -> None:
    tokens = _tokens(emu)
    base_url = emu.base_url
    emu.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(base_url + "/healthz", timeout=TIMEOUT)
    emu.start()
    assert emu.base_url == base_url
    assert _refresh(emu, tokens["refresh_token"]).status_code == 200
    with pytest.raises(RuntimeError):
        emu.start()


def test_stop_is_not_held_by_a_delayed_request(emu: PapertrailEmulator) -> None:
    emu.inject("api", delay=30)
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            _api(emu, "bank", None, params={"system": "xero", "query": "bank_list"}, timeout=TIMEOUT)
        except requests.RequestException as exc:
            errors.append(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    wait_until(lambda: emu.stats["faults_served"], timeout=TIMEOUT, interval=0.01, message="the delayed request")
    started = time.monotonic()
    emu.stop()
    thread.join(TIMEOUT)
    assert time.monotonic() - started < 3
    assert not thread.is_alive()
    assert len(errors) == 1  # the connection was cut, no answer was invented


def test_request_log_never_contains_query_strings(emu: PapertrailEmulator, caplog: pytest.LogCaptureFixture) -> None:
    params = _authorize_params()
    with caplog.at_level(logging.DEBUG, logger="airflow_papertrail.emulator"):
        location = _submit(emu, _consent_form(emu, params).hidden, "allow").headers["Location"]
        code = _query(location)["code"][0]
        _exchange(emu, code)
    emulator_lines = [r.getMessage() for r in caplog.records if r.name == "airflow_papertrail.emulator"]
    assert "GET /api/authorize.php" in emulator_lines
    assert "POST /api/token.php" in emulator_lines
    logged = "\n".join(emulator_lines)
    for value in (code, params["state"], "?", CLIENT_SECRET, *emu.issued_secrets):
        assert value not in logged


def test_import_is_light() -> None:
    code = (
        "import sys, airflow_papertrail.testing.emulator; "
        "bad = [m for m in sys.modules if m == 'airflow' or m.startswith(('airflow.', 'cryptography'))]; "
        "print(bad)"
    )
    root = Path(emulator_module.__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_cli_serves_until_sigterm_and_never_prints_secrets() -> None:
    secret = "cli-secret-" + secrets.token_urlsafe(16)
    remember_secrets(secret)
    root = Path(emulator_module.__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "PAPERTRAIL_EMULATOR_CLIENT_SECRET": secret}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow_papertrail.testing.emulator",
            "--port",
            "0",
            "--tls",
            "--client-id",
            "cli-client",
            "--redirect-uri",
            REDIRECT,
            "--no-rotate",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline().strip()
        second = process.stdout.readline().strip()
        assert first.startswith("papertrail-emulator listening on https://127.0.0.1:"), first
        base_url = first.rsplit(" ", 1)[1]
        ca = second.split(": ", 1)[1]
        assert Path(ca).is_file()
        code_page = requests.get(
            base_url + "/api/authorize.php",
            params=_authorize_params(client_id="cli-client"),
            verify=ca,
            timeout=TIMEOUT,
        )
        assert code_page.status_code == 200
        form = {"grant_type": "client_credentials", "client_id": "cli-client", "client_secret": secret}
        answer = requests.post(base_url + "/api/token.php", data=form, verify=ca, timeout=TIMEOUT)
        assert answer.json()["error"] == "unsupported_grant_type"  # authenticated with the env secret
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert secret not in first + second + out + err
    assert not Path(ca).exists()
