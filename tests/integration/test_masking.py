"""Secrets reach Airflow's masker where they are created or first handled, checked on the
real maskers (not a stand-in callback), with the real metadata DB and the emulator."""

from __future__ import annotations

import secrets
import time
from urllib.parse import urlencode

import pytest
from fastapi.testclient import TestClient

from airflow_papertrail.authorization import AuthorizationStore, PendingAuthorization, pending_variable_key
from airflow_papertrail.hooks.papertrail import PapertrailHook
from airflow_papertrail.oauth.envelope import open_ticket, seal_ticket
from airflow_papertrail.operators.papertrail import PapertrailAuthorizeOperator
from airflow_papertrail.plugins.callback_app import create_app
from airflow_papertrail.refresh import REQUEST_PURPOSE, RESPONSE_PURPOSE
from airflow_papertrail.token_store import OrmVariables, VariableTokenStore, load_cipher
from tests.conftest import CLIENT_ID, REDIRECT_URI, emulator_connection, remember_secrets

pytestmark = pytest.mark.integration

CONN = "pt_masking"


def _task_masker_hides(value: str) -> bool:
    """Whether the Task SDK's masker (task processes, triggerer) replaces ``value``."""
    from airflow.sdk._shared.secrets_masker import redact

    return redact(f"<{value}>") == "<***>"


def _api_server_masker_hides(value: str) -> bool:
    """Whether airflow-core's masker (the one Airflow's api-server code redacts with) replaces ``value``."""
    from airflow._shared.secrets_masker import redact

    return redact(f"<{value}>") == "<***>"


@pytest.fixture
def connection(airflow_db, emulator, monkeypatch, fernet_key):
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN.upper()}", emulator_connection(emulator.base_url))
    return emulator


def test_authorize_task_masks_the_verifier_it_creates(connection):
    result = PapertrailAuthorizeOperator(task_id="authorize", papertrail_conn_id=CONN).execute({})
    store = AuthorizationStore(backend=OrmVariables())  # no masking callback: only the task's own masking counts
    pending = store.load(result["authorization_id"])
    try:
        assert pending is not None and pending.code_verifier
        remember_secrets(pending.code_verifier)
        assert _task_masker_hides(pending.code_verifier)
        assert not _task_masker_hides(pending.state)  # public: it is in the consent URL the task logs
    finally:
        OrmVariables().delete(pending_variable_key(result["authorization_id"]))


def test_callback_on_the_api_server_masks_the_code_and_verifier(connection):
    request = PapertrailHook(CONN).oauth_client.authorization_request(ttl=600)
    pending = PendingAuthorization.from_request(request, conn_id=CONN)
    AuthorizationStore(backend=OrmVariables()).save(pending)
    code = "code-" + secrets.token_urlsafe(24)
    forged = "forged-" + secrets.token_urlsafe(24)
    remember_secrets(code, pending.code_verifier)
    callback = TestClient(create_app())  # what the api-server mounts: ORM, row lock, its masking callback
    try:
        refused = callback.get("/callback?" + urlencode({"code": forged, "state": "A" * 43}))
        assert refused.status_code == 400
        response = callback.get("/callback?" + urlencode({"code": code, "state": pending.state}))
        assert response.status_code == 200, response.text
        assert _api_server_masker_hides(code) and _task_masker_hides(code)
        assert _api_server_masker_hides(pending.code_verifier)
        # an unauthenticated caller cannot add values of its choosing to the masker
        assert not _api_server_masker_hides(forged)
    finally:
        OrmVariables().delete(pending_variable_key(pending.authorization_id))


def test_refresh_route_on_the_api_server_masks_the_tokens(connection):
    emulator = connection
    client = PapertrailHook(CONN).oauth_client
    old = client.exchange_code_unmasked(
        emulator.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT_URI, system="xero")
    )
    store = VariableTokenStore(CONN, backend=OrmVariables())  # no masking callback in the test's own store
    stored = store.save(old.with_expiry(time.time() - 10))
    cipher = load_cipher()
    ticket = seal_ticket(cipher, REQUEST_PURPOSE, {"conn_id": CONN, "seen_generation": stored.generation})
    try:
        response = TestClient(create_app()).post("/token", json={"ticket": ticket})
        assert response.status_code == 200, response.text
        answer = open_ticket(cipher, RESPONSE_PURPOSE, response.json()["ticket"], ttl=300)
        new = store.load().token
        assert answer["access_token"] == new.access_token
        # the grant it decrypted, the refresh token it presented and the tokens it received
        for value in (old.access_token, old.refresh_token, new.access_token, new.refresh_token):
            assert _api_server_masker_hides(value), value[:6]
    finally:
        store.delete()


def test_api_server_masks_stay_bounded_and_keep_what_is_in_use(monkeypatch):
    """Every refresh registers new tokens; a long-lived api-server must not grow its maskers for ever."""
    from airflow._shared.secrets_masker import _secrets_masker as core_masker

    from airflow_papertrail.hooks import papertrail as hook_module

    masker = core_masker()
    before = len(masker.patterns)
    someone_elses = "registered-by-airflow-" + secrets.token_urlsafe(16)
    from airflow._shared.secrets_masker import mask_secret as core_mask_secret

    core_mask_secret(someone_elses)
    client_secret = "client-secret-" + secrets.token_urlsafe(16)
    bound = 40  # the mechanism, at a size where each regex recompile is cheap
    monkeypatch.setattr(hook_module, "MAX_API_SERVER_MASKS", bound, raising=False)
    hook_module.mask_in_api_server(someone_elses)
    for i in range(3 * bound):  # three bounds' worth of refreshed tokens
        hook_module.mask_in_api_server(f"token-{i}-" + "x" * 24)
        if i % 100 == 0:
            hook_module.mask_in_api_server(client_secret)  # used on every coordinator request
    assert len(masker.patterns) <= before + bound + 2  # was before + 3 * bound + 2
    assert _api_server_masker_hides(f"token-{3 * bound - 1}-" + "x" * 24)  # the newest is masked
    assert _api_server_masker_hides(client_secret)  # in use: never evicted
    assert _api_server_masker_hides(someone_elses)  # not ours to remove
    assert not _api_server_masker_hides("token-0-" + "x" * 24)  # long rotated: evicted
