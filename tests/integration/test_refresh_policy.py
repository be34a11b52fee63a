"""When a token is refreshed, and what a lost refresh answer costs (issue 9, items 1 and 3).

Both serializations run the same policy against the real metadata DB and the emulator in
rotating mode with reuse detection: the api-server coordinator (its route, under the row
lock) and the per-machine fallback (``refresh_coordinator = local``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from airflow_papertrail.exceptions import ReauthorizationRequired, TransientOAuthError
from airflow_papertrail.hooks.papertrail import PapertrailHook
from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig, Token
from airflow_papertrail.oauth.envelope import open_ticket, seal_ticket
from airflow_papertrail.plugins.callback_app import create_app
from airflow_papertrail.refresh import REQUEST_PURPOSE, RESPONSE_PURPOSE, get_valid_token
from airflow_papertrail.testing.emulator import EmulatorClient, PapertrailEmulator
from airflow_papertrail.token_store import OrmVariables, VariableTokenStore, load_cipher
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, emulator_connection, remember_secrets

pytestmark = pytest.mark.integration
CONN = "pt_policy"


class Custody:
    """One grant on an emulator whose access tokens live ``ttl`` seconds; ``ask`` = one caller."""

    def __init__(self, ttl: int, monkeypatch, mode: str) -> None:
        self.emulator = PapertrailEmulator(
            clients=[EmulatorClient(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI])], access_token_ttl=ttl
        ).start()
        monkeypatch.setenv(f"AIRFLOW_CONN_{CONN.upper()}", emulator_connection(self.emulator.base_url))
        monkeypatch.setenv("AIRFLOW__PAPERTRAIL__REFRESH_COORDINATOR", "local")
        self.mode = mode
        config = OAuthClientConfig(
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            redirect_uri=REDIRECT_URI,
            system="xero",
            base_url=self.emulator.base_url,
        )
        self.config = config
        code = self.emulator.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT_URI, system="xero")
        self.first = OAuthClient(config).exchange_code(code)
        self.store = VariableTokenStore(CONN, backend=OrmVariables())
        self.store.delete()  # the session's metadata DB outlives each test: start without a grant
        self.client = TestClient(create_app())
        self.cipher = load_cipher()

    def save(self, token: Token):
        current = self.store.load()
        return self.store.save(token, based_on=current)

    def expire(self, by: float = 10.0):
        """Store the current token as expired ``by`` seconds ago (same refresh token)."""
        current = self.store.load()
        token = current.token if current else self.first
        lifetime = token.expires_at - token.obtained_at
        now = time.time()
        return self.save(Token(**{**token.to_dict(), "obtained_at": now - by - lifetime, "expires_at": now - by}))

    def due(self, remaining: float = 60.0, *, refresh_token: bool = True):
        """Store a 1-hour token that is inside the 120 s leeway but valid for ``remaining`` s."""
        now = time.time()
        fields = {**self.first.to_dict(), "obtained_at": now + remaining - 3600, "expires_at": now + remaining}
        if not refresh_token:
            fields["refresh_token"] = None
        return self.save(Token(**fields))

    def ask(self, *, force: bool = False) -> Token:
        """What a task gets: through the coordinator route, or the local fallback."""
        seen = self.store.load()
        if self.mode == "local":
            return get_valid_token(PapertrailHook(CONN), force_refresh=force)
        ticket = seal_ticket(
            self.cipher, REQUEST_PURPOSE, {"conn_id": CONN, "seen_generation": seen.generation, "force": force}
        )
        response = self.client.post("/token", json={"ticket": ticket})
        body = response.json()
        if response.status_code == 409:
            raise ReauthorizationRequired(CONN, body["message"])
        if response.status_code != 200:
            raise TransientOAuthError(body["message"])
        answer = open_ticket(self.cipher, RESPONSE_PURPOSE, body["ticket"])
        return Token(
            access_token=answer["access_token"],
            token_type="Bearer",
            obtained_at=answer["obtained_at"],
            expires_at=answer["expires_at"],
        )

    def stop(self) -> None:
        self.emulator.stop()
        remember_secrets(*self.emulator.issued_secrets)


@pytest.fixture
def no_quiet_period(monkeypatch):
    """The next try comes at once here; the quiet period has a test of its own."""
    from airflow_papertrail import refresh

    monkeypatch.setattr(refresh, "RETRY_QUIET_SECONDS", 0.0)


@pytest.fixture(params=["api-server", "local"])
def custody(request, airflow_db, monkeypatch, fernet_key):
    made: list[Custody] = []

    def make(ttl: int = 3600) -> Custody:
        c = Custody(ttl, monkeypatch, request.param)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


@pytest.mark.parametrize("ttl", [30, 300, 3600])
def test_concurrent_callers_cause_one_refresh_whatever_the_lifetime(custody, ttl):
    c = custody(ttl)
    c.expire()
    with ThreadPoolExecutor(max_workers=16) as pool:
        tokens = list(pool.map(lambda _: c.ask(), range(16)))
    assert c.emulator.stats["refresh_grants"] == 1  # was 16 with lifetimes under the 120 s leeway
    assert len({t.access_token for t in tokens}) == 1
    assert c.store.load().generation == 2


def test_a_short_lived_token_is_not_refreshed_before_half_its_life(custody):
    c = custody(5)  # 5 s tokens, leeway 120 s: effective leeway min(120, 5 / 2) = 2.5 s
    c.save(c.first)
    for _ in range(5):
        c.ask()
    assert c.emulator.stats["refresh_grants"] == 0  # was one refresh per call
    grant = c.store.load()
    assert grant.token.expires_at - grant.token.obtained_at == pytest.approx(5, abs=1)


def test_a_grant_without_refresh_token_is_used_until_it_really_expires(custody):
    c = custody()
    c.due(refresh_token=False)
    assert c.ask().access_token == c.first.access_token  # was ReauthorizationRequired
    c.expire()
    with pytest.raises(ReauthorizationRequired, match="no refresh token"):
        c.ask()


def _answer_lost(c: Custody, fault: dict) -> None:
    c.emulator.inject("token", **fault)


LOST_AFTER_ROTATION = [
    pytest.param({"drop_after_processing": True}, id="response-lost-after-rotation"),
    pytest.param({"status": 500, "after_processing": True}, id="500-after-rotation"),
    pytest.param(
        {"status": 200, "body": "<br/>Notice: PHP <b>oops</b>", "after_processing": True}, id="unparseable-2xx"
    ),
]


@pytest.mark.parametrize("fault", LOST_AFTER_ROTATION)
def test_a_lost_answer_keeps_the_grant_while_its_access_token_is_valid(custody, fault):
    c = custody()
    c.due()  # due for refresh (inside the leeway) but valid for another minute
    _answer_lost(c, fault)
    assert c.ask().access_token == c.first.access_token  # the task goes on with the current token
    grant = c.store.load()
    assert grant.refresh_outcome_unknown and grant.generation == 1  # the marker is no new generation
    calls = c.emulator.stats["token_requests"]
    for _ in range(3):  # later callers keep using it and hold the old refresh token back
        assert c.ask().access_token == c.first.access_token
    assert c.emulator.stats["token_requests"] == calls
    assert c.emulator.stats["grants_revoked"] == 0


@pytest.mark.parametrize("fault", LOST_AFTER_ROTATION)
def test_after_rotation_the_second_try_ends_in_reauthorization(custody, no_quiet_period, fault):
    c = custody(3600)
    c.expire()
    _answer_lost(c, fault)
    with pytest.raises(TransientOAuthError, match="retry"):  # retryable, the grant is kept
        c.ask()
    assert c.store.load().refresh_outcome_unknown
    with pytest.raises(ReauthorizationRequired):  # the server rotated: the old token is refused
        c.ask()
    assert c.emulator.stats["token_requests"] == 3  # exchange + the lost refresh + exactly one more try
    with pytest.raises(ReauthorizationRequired):
        c.ask()
    assert c.emulator.stats["token_requests"] == 3  # never a third presentation


def test_lost_before_rotation_recovers_on_the_next_try(custody, no_quiet_period):
    c = custody(3600)
    c.expire()
    c.emulator.inject("token", status=502)  # a gateway's 502: the server may or may not have processed it
    with pytest.raises(TransientOAuthError, match="retry"):
        c.ask()
    token = c.ask()  # the old refresh token once more: the server never saw it, so it works
    assert token.access_token != c.first.access_token
    grant = c.store.load()
    assert not grant.refresh_outcome_unknown and grant.generation == 2
    assert c.emulator.stats["refresh_grants"] == 1 and c.emulator.stats["grants_revoked"] == 0


def test_two_lost_answers_in_a_row_end_the_grant(custody, no_quiet_period):
    c = custody(3600)
    c.expire()
    c.emulator.inject("token", status=502, times=2)
    with pytest.raises(TransientOAuthError):
        c.ask()
    with pytest.raises(ReauthorizationRequired, match="lost"):
        c.ask()
    calls = c.emulator.stats["token_requests"]
    with pytest.raises(ReauthorizationRequired):
        c.ask()
    assert c.emulator.stats["token_requests"] == calls


def test_edited_endpoints_never_receive_the_tokens(custody, monkeypatch):
    """A grant remembers the client and endpoints of its consent (issue 9 item 5)."""
    c = custody()
    other = PapertrailEmulator(clients=[EmulatorClient(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI])]).start()
    try:
        now = time.time()
        expired = Token(**{**c.first.to_dict(), "obtained_at": now - 4000, "expires_at": now - 10})
        c.store.save(expired, issued_for=c.config.binding())
        monkeypatch.setenv(f"AIRFLOW_CONN_{CONN.upper()}", emulator_connection(other.base_url))  # edited after consent
        with pytest.raises(ReauthorizationRequired, match="token_url, api_origin changed since consent"):
            c.ask()
        c.store.save(c.first, based_on=c.store.load())  # valid again: a data call, no refresh needed
        with pytest.raises(ReauthorizationRequired, match="changed since consent"):
            PapertrailHook(CONN).query("company", "co_details")
        assert other.stats["token_requests"] == 0 and other.stats["api_requests"] == 0
        assert c.emulator.stats["refresh_grants"] == 0
    finally:
        other.stop()


def test_a_refresh_binds_a_grant_stored_before_bindings(custody):
    c = custody()
    c.expire()  # saved without issued_for, as older releases did
    assert c.store.load().issued_for is None
    c.ask()
    assert c.store.load().issued_for == c.config.binding()


def test_after_a_lost_answer_the_token_is_presented_again_only_after_a_quiet_period(custody, monkeypatch):
    """The lost request may still be in the server's hands: a second one racing it would look like reuse."""
    from airflow_papertrail import refresh

    c = custody()
    c.expire()
    c.emulator.inject("token", status=502)
    with pytest.raises(TransientOAuthError, match="was lost"):
        c.ask()
    calls = c.emulator.stats["token_requests"]
    with pytest.raises(TransientOAuthError, match="presented again only 60 s after"):
        c.ask()
    assert c.emulator.stats["token_requests"] == calls  # nothing presented inside the quiet period
    monkeypatch.setattr(refresh, "RETRY_QUIET_SECONDS", 0.0)  # ... and once it has passed:
    assert c.ask().access_token != c.first.access_token


def test_a_401_never_refreshes_a_grant_someone_else_refreshed_since(custody):
    """Issue 9 item 1 / 13 item 7: the refused token's generation, not the stored one, decides."""
    c = custody()
    c.save(c.first)  # generation 1, valid
    hook = PapertrailHook(CONN)
    assert hook.get_access_token() == c.first.access_token and hook.issued_generation == 1
    newer = c.ask(force=True)  # another task got a 401 and refreshed: generation 2
    assert c.store.load().generation == 2
    refreshes = c.emulator.stats["refresh_grants"]
    assert hook.get_access_token(force_refresh=True) == newer.access_token  # our 401 was for generation 1
    assert c.emulator.stats["refresh_grants"] == refreshes  # was one more rotation
