"""Grant health (``health.py``): every path that stores or fails to refresh a grant records it,
in a plain Variable that never holds a secret; reading it decrypts nothing.

Real OAuth exchanges and refreshes against the emulator on 127.0.0.1, with the token store on
an in-memory Variable backend (the real-Variables path is the same ``VariableBackend``)."""

from __future__ import annotations

import json

import pytest
from cryptography.fernet import Fernet

from airflow_papertrail import health
from airflow_papertrail.authorization import store_grant
from airflow_papertrail.exceptions import ReauthorizationRequired, TransientOAuthError
from airflow_papertrail.health import GrantHealth, health_variable_key, read_health, record_grant, record_use
from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig, RetryPolicy
from airflow_papertrail.oauth.envelope import TokenCipher
from airflow_papertrail.refresh import refresh_grant
from airflow_papertrail.token_store import VariableTokenStore, grant_variable_key
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI
from tests.unit.test_token_store import MemoryVariables

FAST = RetryPolicy(total=2, backoff_factor=0.01, backoff_max=0.05, backoff_jitter=0, max_retry_after=1)
CONN = "pt_health"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingVariables(MemoryVariables):
    def __init__(self) -> None:
        super().__init__()
        self.sets: list[str] = []
        self.gets: list[str] = []

    def get(self, key):
        self.gets.append(key)
        return super().get(key)

    def set(self, key, value, description=None):
        self.sets.append(key)
        super().set(key, value, description)


@pytest.fixture
def refresh_emulator():
    from airflow_papertrail.testing.emulator import EmulatorClient, PapertrailEmulator
    from tests.conftest import remember_secrets

    emu = PapertrailEmulator(
        clients=[EmulatorClient(CLIENT_ID, CLIENT_SECRET, [REDIRECT_URI])],
        refresh_token_ttl=8_726_400,
        refresh_token_member="x_refresh_token_expires_in",
    ).start()
    try:
        yield emu
    finally:
        emu.stop()
        remember_secrets(*emu.issued_secrets)


def _client(emu) -> OAuthClient:
    config = OAuthClientConfig(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        scope="accounting.read accounting.write",
        system="xero",
        base_url=emu.base_url,
        timeout=5,
    )
    return OAuthClient(config, retry_policy=FAST)


def _consent(emu, store, client):
    code = emu.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT_URI, scope="accounting.read accounting.write")
    store_grant(CONN, client.exchange_code(code), store, issued_for=client.config.binding())
    return store.load()


def _store(clock, backend=None) -> VariableTokenStore:
    cipher = TokenCipher([Fernet.generate_key().decode()])
    return VariableTokenStore(CONN, cipher=cipher, backend=backend or CountingVariables(), clock=clock)


def _raw_health(store) -> dict:
    return json.loads(store.backend.values[health_variable_key(CONN)])


def test_every_path_records_health_and_no_secret_reaches_it(refresh_emulator):
    emu = refresh_emulator
    clock = Clock(emu.clock())
    store = _store(clock)
    client = _client(emu)
    assert read_health(CONN, backend=store.backend).state == "not_connected"

    # consent (the authorization redemption stores through save)
    grant = _consent(emu, store, client)
    h = read_health(CONN, backend=store.backend, clock=clock)
    assert (h.state, h.generation, h.scopes) == ("valid", 1, ["accounting.read", "accounting.write"])
    assert h.authorized_at == clock.now and h.last_refresh_at is None and h.last_error is None
    assert h.access_expires_at == grant.token.expires_at
    assert h.refresh_expires_at == pytest.approx(clock.now + 8_726_400, abs=5) and h.has_refresh_token
    raws = [store.backend.values[health_variable_key(CONN)]]

    # a refresh
    clock.now += 100
    grant, error = refresh_grant(grant, client=client, store=store, write=store.write, force=True, clock=clock)
    assert error is None
    h = read_health(CONN, backend=store.backend, clock=clock)
    assert (h.state, h.generation, h.last_refresh_at) == ("valid", 2, clock.now)
    raws.append(store.backend.values[health_variable_key(CONN)])

    # a transient failure (429s until the retries are spent): nothing spent, grant unchanged
    emu.inject("token", status=429, retry_after=0, times=5)
    with pytest.raises(TransientOAuthError):
        refresh_grant(grant, client=client, store=store, write=store.write, force=True, clock=clock)
    emu.clear_faults()
    h = read_health(CONN, backend=store.backend, clock=clock)
    assert h.state == "refresh_failing" and h.generation == 2 and h.last_error["code"]
    raws.append(store.backend.values[health_variable_key(CONN)])

    # a lost answer
    emu.inject("token", drop_after_processing=True)
    grant, error = refresh_grant(grant, client=client, store=store, write=store.write, force=True, clock=clock)
    h = read_health(CONN, backend=store.backend, clock=clock)
    assert h.state == "outcome_unknown" and h.last_error["code"] == "refresh_outcome_unknown"
    raws.append(store.backend.values[health_variable_key(CONN)])

    # a refused refresh token (revoked at the server): the OAuth error and the safe reason
    assert emu.revoke_grant(grant.token.refresh_token)
    clock.now += 120
    grant, error = refresh_grant(grant, client=client, store=store, write=store.write, force=True, clock=clock)
    assert isinstance(error, ReauthorizationRequired)
    h = read_health(CONN, backend=store.backend, clock=clock)
    assert h.state == "reauthorization_required" and h.reauthorization_error == "invalid_grant"
    assert h.last_error["description"]
    raws.append(store.backend.values[health_variable_key(CONN)])

    # consent again: valid, error cleared
    _consent(emu, store, client)
    h = read_health(CONN, backend=store.backend, clock=clock)
    assert h.state == "valid" and h.last_error is None
    raws.append(store.backend.values[health_variable_key(CONN)])

    issued = emu.issued_secrets
    assert len(issued) >= 6
    for raw in raws:
        json.loads(raw)  # plain JSON
        for secret in [*issued, CLIENT_SECRET]:
            assert secret not in raw, "a token, code or the client secret reached the health Variable"
    assert "do not edit" in store.backend.descriptions[health_variable_key(CONN)]


def test_reading_health_decrypts_nothing(monkeypatch):
    monkeypatch.delenv("AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS", raising=False)
    backend = CountingVariables()
    backend.values[grant_variable_key(CONN)] = "not even an envelope"
    assert read_health(CONN, backend=backend).state == "not_recorded"  # the grant exists; nothing opened
    backend.values[health_variable_key(CONN)] = GrantHealth(CONN, state="valid", generation=3).to_json()
    backend.gets.clear()
    assert read_health(CONN, backend=backend).generation == 3
    assert backend.gets == [health_variable_key(CONN)]  # one plain read, no key needed


def test_last_use_is_written_at_most_once_an_hour(monkeypatch):
    monkeypatch.setattr(health, "_USE_NOTED", {})
    backend = CountingVariables()
    backend.values[health_variable_key(CONN)] = GrantHealth(CONN, state="valid", generation=1).to_json()
    t = 1_800_000_000.0
    assert record_use(backend, CONN, now=t) is True
    gets = len(backend.gets)
    for i in range(100):  # a hundred calls in this process within the hour: no read, no write
        assert record_use(backend, CONN, now=t + i) is False
    assert len(backend.gets) == gets and backend.sets.count(health_variable_key(CONN)) == 1
    monkeypatch.setattr(health, "_USE_NOTED", {})  # another task process within the hour: a read, no write
    assert record_use(backend, CONN, now=t + 1800) is False
    assert backend.sets.count(health_variable_key(CONN)) == 1
    assert record_use(backend, CONN, now=t + 3700) is True
    assert read_health(CONN, backend=backend, clock=lambda: t + 3700).last_used_at == t + 3700


def test_health_never_moves_to_an_older_generation(refresh_emulator):
    emu = refresh_emulator
    clock = Clock(emu.clock())
    store = _store(clock)
    client = _client(emu)
    first = _consent(emu, store, client)
    newer, _ = refresh_grant(first, client=client, store=store, write=store.write, force=True, clock=clock)
    record_grant(store.backend, first, now=clock.now + 5)  # a late writer with the older grant
    assert read_health(CONN, backend=store.backend).generation == newer.generation == 2


def test_time_alone_turns_an_expired_refresh_token_into_reauthorization():
    h = GrantHealth(CONN, state="valid", generation=1, refresh_expires_at=100.0, has_refresh_token=True)
    assert h.as_of(99.0).state == "valid"
    late = h.as_of(100.0)
    assert late.state == "reauthorization_required" and late.reauthorization_error == "refresh_token_expired"
    no_refresh = GrantHealth(CONN, state="valid", access_expires_at=50.0, has_refresh_token=False)
    assert no_refresh.as_of(60.0).reauthorization_error == "no_refresh_token"


def test_a_failed_health_write_never_fails_the_token_path(refresh_emulator, caplog):
    class HealthWritesFail(MemoryVariables):
        def set(self, key, value, description=None):
            if key.startswith("papertrail_health__"):
                raise RuntimeError("Variable API down")
            super().set(key, value, description)

    emu = refresh_emulator
    store = _store(Clock(emu.clock()), backend=HealthWritesFail())
    grant = _consent(emu, store, _client(emu))
    assert grant.generation == 1 and "Could not record the grant health" in caplog.text


def test_hook_grant_health_reads_the_plain_variable():
    from airflow_papertrail.hooks.papertrail import PapertrailHook

    backend = CountingVariables()
    backend.values[health_variable_key(CONN)] = GrantHealth(CONN, state="refresh_failing", generation=4).to_json()
    hook = PapertrailHook(CONN)
    hook.__dict__["token_store"] = VariableTokenStore(CONN, backend=backend)
    h = hook.grant_health()
    assert (h.state, h.generation) == ("refresh_failing", 4)


def test_a_connection_repointed_since_consent_records_reauthorization(refresh_emulator, monkeypatch):
    """``endpoints_changed`` (refresh.check_binding) is recorded where the task meets it."""
    from airflow_papertrail.hooks.papertrail import PapertrailHook
    from airflow_papertrail.refresh import get_valid_token

    emu = refresh_emulator
    store = _store(Clock(emu.clock()))
    client = _client(emu)
    _consent(emu, store, client)
    hook = PapertrailHook(CONN)
    hook.__dict__["token_store"] = store
    hook.__dict__["config"] = OAuthClientConfig(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, base_url="https://elsewhere.example.com", system="xero"
    )
    with pytest.raises(ReauthorizationRequired):
        get_valid_token(hook)
    h = read_health(CONN, backend=store.backend)
    assert h.state == "reauthorization_required" and h.reauthorization_error == "endpoints_changed"
