from __future__ import annotations

import base64
from urllib.parse import parse_qs, urlsplit

import pytest

from airflow_papertrail.exceptions import PapertrailConfigurationError
from airflow_papertrail.oauth import (
    OAuthClientConfig,
    build_authorization_request,
    code_challenge_s256,
    new_code_verifier,
    new_state,
    states_match,
)

CONFIG = OAuthClientConfig(
    client_id="cid",
    client_secret="super-secret-value-123",
    redirect_uri="https://airflow.example.com/papertrail/callback",
    scope="accounting.read accounting.write",
    system="xero",
)


def _b64len(bits: int) -> int:
    return len(base64.urlsafe_b64encode(b"\0" * (bits // 8)).rstrip(b"="))


def test_state_has_256_bits_and_never_repeats():
    states = {new_state() for _ in range(2000)}
    assert len(states) == 2000
    assert all(len(s) == _b64len(256) for s in states)


def test_verifier_is_32_random_bytes_base64url():
    verifier = new_code_verifier()
    assert len(verifier) == 43  # RFC 7636 4.1: 43..128 characters
    assert set(verifier) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_s256_matches_rfc7636_appendix_b():
    assert (
        code_challenge_s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
        == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )


def test_authorization_url_carries_documented_parameters_and_no_secret():
    req = build_authorization_request(CONFIG, now=1000.0, ttl=600)
    parts = urlsplit(req.url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://www.papertrail-ai.com/api/authorize.php"
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert q["response_type"] == "code"
    assert q["client_id"] == "cid"
    assert q["redirect_uri"] == CONFIG.redirect_uri
    assert q["scope"] == "accounting.read accounting.write"
    assert q["system"] == "xero"
    assert q["state"] == req.state
    assert q["code_challenge_method"] == "S256"
    assert q["code_challenge"] == code_challenge_s256(req.code_verifier)
    assert "super-secret-value-123" not in req.url
    assert req.code_verifier not in req.url
    assert req.expires_at == 1600.0
    # the verifier is independent of the state (one peer derives it from the state)
    assert req.code_verifier != req.state and code_challenge_s256(req.state) != q["code_challenge"]
    assert req.state not in repr(req) and req.code_verifier not in repr(req)


def test_pkce_can_be_switched_off_and_is_never_plain():
    config = OAuthClientConfig(**{**CONFIG.__dict__, "use_pkce": False})
    req = build_authorization_request(config, now=0)
    q = parse_qs(urlsplit(req.url).query)
    assert "code_challenge" not in q and "code_challenge_method" not in q
    assert req.code_verifier is None


def test_authorize_url_override_keeps_its_own_query():
    config = OAuthClientConfig(**{**CONFIG.__dict__, "authorize_url": "https://proxy.example.com/auth?tenant=7"})
    q = parse_qs(urlsplit(build_authorization_request(config, now=0).url).query)
    assert q["tenant"] == ["7"] and q["client_id"] == ["cid"]


@pytest.mark.parametrize("name", ["client_secret", "code_verifier", "state", "code", "redirect_uri"])
def test_extra_params_cannot_override_protocol_parameters(name):
    with pytest.raises(ValueError, match="reserved"):
        build_authorization_request(CONFIG, now=0, extra_params={name: "x"})


def test_authorization_needs_a_redirect_uri():
    config = OAuthClientConfig(client_id="cid", client_secret="s" * 10, system="xero")
    with pytest.raises(PapertrailConfigurationError, match="redirect_uri is missing"):
        build_authorization_request(config, now=0)


@pytest.mark.parametrize(
    ("expected", "received", "result"),
    [
        ("abc", "abc", True),
        ("abc", "abd", False),
        ("abc", "", False),
        ("", "", False),
        (None, "abc", False),
        ("abc", None, False),
    ],
)
def test_states_match(expected, received, result):
    assert states_match(expected, received) is result
