"""The OAuth core against a real token endpoint on 127.0.0.1 (the shipped emulator)."""

from __future__ import annotations

import socket
import time

import pytest

from airflow_papertrail.exceptions import (
    InvalidClientError,
    InvalidGrantError,
    OAuthError,
    RefreshOutcomeUnknown,
    TransientOAuthError,
)
from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig, RetryPolicy
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, remember_secrets

FAST = RetryPolicy(total=3, backoff_factor=0.01, backoff_max=0.05, backoff_jitter=0, max_retry_after=2)


def _client(emu, *, masked=None, **changes) -> OAuthClient:
    fields = {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "redirect_uri": REDIRECT_URI,
        "scope": "accounting.read",
        "system": "xero",
        "base_url": emu.base_url,
        "timeout": 5,
        **changes,
    }
    return OAuthClient(
        OAuthClientConfig(**fields), retry_policy=FAST, on_secret=(masked.append if masked is not None else None)
    )


def _code(emu, **kw) -> str:
    return emu.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT_URI, scope="accounting.read", system="xero", **kw)


@pytest.mark.parametrize("method", ["client_secret_post", "client_secret_basic"])
def test_exchange_code_and_refresh(emulator, method):
    masked: list[str] = []
    client = _client(emulator, masked=masked, client_auth_method=method)
    code = _code(emulator)
    before = time.time()
    token = client.exchange_code(code)
    assert token.access_token in emulator.issued_secrets
    assert token.refresh_token in emulator.issued_secrets
    assert before + 3600 - 5 <= token.expires_at <= time.time() + 3600  # absolute expiry from expires_in
    assert token.scope == "accounting.read"
    # every sensitive value was handed to the masker as soon as it existed
    assert {CLIENT_SECRET, code, token.access_token, token.refresh_token} <= set(masked)

    refreshed = client.refresh(token.refresh_token, previous=token)
    assert refreshed.access_token != token.access_token
    assert refreshed.refresh_token != token.refresh_token  # the emulator rotates
    assert emulator.grant_is_active(refreshed.refresh_token)
    assert refreshed.refresh_token in masked
    assert emulator.stats["refresh_grants"] == 1


def test_code_is_single_use_and_invalid_grant_is_final(emulator):
    client = _client(emulator)
    code = _code(emulator)
    client.exchange_code(code)
    requests_before = emulator.stats["token_requests"]
    with pytest.raises(InvalidGrantError) as err:
        client.exchange_code(code)
    assert emulator.stats["token_requests"] == requests_before + 1  # not retried
    assert err.value.error == "invalid_grant" and err.value.status == 400
    assert "papertrail_authorize" in str(err.value)
    assert code not in str(err.value)


def test_pkce_verifier_is_sent(emulator):
    client = _client(emulator)
    request = client.authorization_request()
    from urllib.parse import parse_qs, urlsplit

    q = {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}
    code = _code(emulator, code_challenge=q["code_challenge"], code_challenge_method="S256")
    with pytest.raises(InvalidGrantError):
        client.exchange_code(code, code_verifier="wrong-" + request.code_verifier)
    code = _code(emulator, code_challenge=q["code_challenge"], code_challenge_method="S256")
    assert client.exchange_code(code, code_verifier=request.code_verifier).access_token


def test_exchange_sends_the_redirect_uri_of_the_authorization_request(emulator):
    # The connection now names another redirect URI than the one the code was issued for.
    client = _client(emulator, redirect_uri="https://airflow.example.com/papertrail/callback")
    assert client.exchange_code(_code(emulator), redirect_uri=REDIRECT_URI).access_token
    assert client.exchange_code_unmasked(_code(emulator), redirect_uri=REDIRECT_URI).access_token
    with pytest.raises(InvalidGrantError, match="redirect_uri differs"):  # the emulator compares exactly
        client.exchange_code(_code(emulator))


def test_authorization_request_hands_the_verifier_to_the_masker(emulator):
    masked: list[str] = []
    request = _client(emulator, masked=masked).authorization_request()
    assert request.code_verifier and request.code_verifier in masked  # masked where it is created
    assert request.state not in masked  # public: it is in the consent URL that is logged
    remember_secrets(request.code_verifier)


@pytest.mark.parametrize("method", ["client_secret_post", "client_secret_basic"])
def test_wrong_secret_is_invalid_client(emulator, method):
    client = _client(emulator, client_secret="wrong-secret-value", client_auth_method=method)
    with pytest.raises(InvalidClientError) as err:
        client.exchange_code(_code(emulator))
    assert err.value.status == 401
    assert "client_secret" in str(err.value) and "wrong-secret-value" not in str(err.value)


def test_retry_after_is_honoured_then_succeeds(emulator):
    emulator.inject("token", status=429, retry_after=1)
    client = _client(emulator)
    start = time.monotonic()
    token = client.exchange_code(_code(emulator))
    assert token.access_token
    assert time.monotonic() - start >= 0.9  # waited as asked
    assert emulator.stats["faults_served"] == 1


def test_too_long_retry_after_fails_fast_and_says_so(emulator):
    emulator.inject("token", status=429, retry_after=3600)
    start = time.monotonic()
    with pytest.raises(TransientOAuthError) as err:
        _client(emulator).exchange_code(_code(emulator))
    assert time.monotonic() - start < 2
    assert "3600" in str(err.value) and err.value.status == 429


def test_5xx_is_retried_with_backoff_for_the_exchange(emulator):
    emulator.inject("token", status=500, times=2)
    assert _client(emulator).exchange_code(_code(emulator)).access_token
    assert emulator.stats["faults_served"] == 2


def test_persistent_5xx_is_bounded(emulator):
    emulator.inject("token", status=502, times=10)
    with pytest.raises(TransientOAuthError, match="HTTP 502"):
        _client(emulator).exchange_code(_code(emulator))
    assert emulator.stats["faults_served"] == FAST.total + 1


def test_lost_exchange_response_is_retried(emulator):
    # a lost code response is harmless to replay: the server refuses the second use at worst
    emulator.inject("token", drop=True)
    assert _client(emulator).exchange_code(_code(emulator)).access_token


def test_refresh_with_lost_response_is_never_replayed(emulator):
    client = _client(emulator)
    token = client.exchange_code(_code(emulator))
    emulator.inject("token", drop_after_processing=True)
    with pytest.raises(RefreshOutcomeUnknown, match="not replayed"):
        client.refresh(token.refresh_token, previous=token)
    assert emulator.stats["refresh_grants"] == 1  # exactly one attempt reached the server
    assert emulator.stats["grants_revoked"] == 0  # and the old token was not replayed


def test_refresh_timeout_is_outcome_unknown(emulator):
    client = _client(emulator, timeout=0.5)
    token = client.exchange_code(_code(emulator))
    emulator.inject("token", delay=2)
    with pytest.raises(RefreshOutcomeUnknown):
        client.refresh(token.refresh_token, previous=token)
    assert emulator.stats["grants_revoked"] == 0


def test_refresh_only_429_is_resent_every_5xx_is_outcome_unknown(emulator):
    client = _client(emulator)
    token = client.exchange_code(_code(emulator))
    emulator.inject("token", status=429, retry_after=0)  # refused before processing: re-sent by urllib3
    token = client.refresh(token.refresh_token, previous=token)
    assert emulator.stats["faults_served"] == 1
    for status in (500, 502, 503, 504):  # may come after the rotation: sent once, never re-posted
        emulator.inject("token", status=status)
        before = emulator.stats["token_requests"]
        with pytest.raises(RefreshOutcomeUnknown, match=f"HTTP {status}"):
            client.refresh(token.refresh_token, previous=token)
        assert emulator.stats["token_requests"] == before + 1
    assert emulator.stats["grants_revoked"] == 0


def test_refresh_answered_2xx_but_unusable_is_outcome_unknown(emulator):
    client = _client(emulator)
    token = client.exchange_code(_code(emulator))
    emulator.inject("token", status=200, body="<br/>Notice: undefined index", after_processing=True)
    with pytest.raises(RefreshOutcomeUnknown, match="not with JSON"):
        client.refresh(token.refresh_token, previous=token)
    emulator.inject("token", status=200, body={"token_type": "Bearer"}, after_processing=True)
    with pytest.raises(RefreshOutcomeUnknown, match="no access_token"):
        client.refresh(token.refresh_token, previous=token)


def test_refresh_token_reuse_is_invalid_grant(emulator):
    client = _client(emulator)
    first = client.exchange_code(_code(emulator))
    client.refresh(first.refresh_token, previous=first)
    with pytest.raises(InvalidGrantError):
        client.refresh(first.refresh_token, previous=first)
    assert emulator.stats["grants_revoked"] == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_transient_not_unknown():
    config = OAuthClientConfig(
        client_id="a",
        client_secret="b" * 10,
        redirect_uri=REDIRECT_URI,
        system="xero",
        base_url=f"http://127.0.0.1:{_closed_port()}",
    )
    client = OAuthClient(config, retry_policy=FAST)
    with pytest.raises(TransientOAuthError) as err:
        client.refresh("r" * 20)
    assert not isinstance(err.value, RefreshOutcomeUnknown)  # never sent: safe to retry later
    with pytest.raises(TransientOAuthError, match="could not reach"):
        client.exchange_code("c" * 20)


def test_tls_is_verified_with_ca_bundle(tls_emulator):
    ok = _client(tls_emulator, ca_bundle=tls_emulator.ca_cert_path)
    assert ok.exchange_code(_code(tls_emulator)).access_token
    with pytest.raises(TransientOAuthError, match="ca_bundle"):
        _client(tls_emulator).exchange_code(_code(tls_emulator))


@pytest.mark.parametrize(
    ("status", "body", "expected", "error"),
    [
        (400, {"error": "invalid_grant", "error_description": "expired"}, InvalidGrantError, "invalid_grant"),
        (401, {"error": "invalid_client"}, InvalidClientError, "invalid_client"),
        (400, {"error": "invalid_client"}, InvalidClientError, "invalid_client"),
        (401, None, InvalidClientError, "invalid_client"),
        (400, {"error": "invalid_scope", "error_description": "no"}, OAuthError, "invalid_scope"),
        (400, {"error": "unsupported_grant_type"}, OAuthError, "unsupported_grant_type"),
        (403, {"nothing": 1}, OAuthError, "invalid_response"),
        (200, {"token_type": "bearer"}, OAuthError, "invalid_response"),
    ],
)
def test_error_mapping(emulator, status, body, expected, error):
    emulator.inject("token", status=status, body=body if body is not None else {})
    with pytest.raises(expected) as err:
        _client(emulator).exchange_code(_code(emulator))
    assert type(err.value) is expected
    assert err.value.error == error
    assert err.value.status == status


def test_echoed_secrets_in_error_descriptions_are_redacted(emulator):
    leaked = "ZXhhbXBsZS1sZWFrZWQtdG9rZW4tdmFsdWUtMTIzNDU2"
    emulator.inject("token", status=400, body={"error": "invalid_request", "error_description": f"bad code {leaked}"})
    with pytest.raises(OAuthError) as err:
        _client(emulator).exchange_code(_code(emulator))
    assert leaked not in str(err.value) and "[redacted]" in str(err.value)


@pytest.mark.parametrize(
    ("changes", "ok", "fragment"),
    [
        ({}, True, "credentials accepted"),
        ({"client_secret": "wrong-secret-value"}, False, "client rejected"),
        ({"client_id": "unknown-client"}, False, "client rejected"),
        ({"client_auth_method": "client_secret_basic"}, True, "credentials accepted"),
    ],
)
def test_probe_never_spends_anything(emulator, changes, ok, fragment):
    result = _client(emulator, **changes).probe()
    assert result.ok is ok
    assert fragment in result.message
    assert emulator.stats["authorization_code_grants"] == 0
    assert emulator.stats["refresh_grants"] == 0


def test_probe_unreachable():
    config = OAuthClientConfig(
        client_id="a",
        client_secret="b" * 10,
        redirect_uri=REDIRECT_URI,
        system="xero",
        base_url=f"http://127.0.0.1:{_closed_port()}",
    )
    result = OAuthClient(config, retry_policy=FAST).probe()
    assert result.ok is False and "could not reach" in result.message


def test_fake_secret_values_are_remembered_for_the_canary():
    remember_secrets("wrong-secret-value")


@pytest.mark.parametrize("method", ["client_secret_post", "client_secret_basic"])
def test_netrc_never_replaces_the_client_credentials(emulator, method, tmp_path, monkeypatch):
    """requests applies ~/.netrc when no auth is given (trust_env): it would overwrite our Basic header."""
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login intruder password not-the-client-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    client = _client(emulator, client_auth_method=method)
    token = client.exchange_code(_code(emulator))  # invalid_client if the netrc login were sent
    client.refresh(token.refresh_token, previous=token)
    assert emulator.stats["invalid_client_errors"] == 0
