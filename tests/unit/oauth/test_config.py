from __future__ import annotations

import pytest

from airflow_papertrail.exceptions import PapertrailConfigurationError
from airflow_papertrail.oauth import OAuthClientConfig
from airflow_papertrail.oauth.config import is_loopback_host, system_warnings

GOOD = {
    "client_id": "cid",
    "client_secret": "secret-value",
    "redirect_uri": "https://af.example.com/papertrail/callback",
    "system": "xero",
}


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"client_id": ""}, "client ID is missing"),
        ({"client_secret": ""}, "client secret is missing"),
        ({"redirect_uri": None}, "redirect_uri is missing"),
        ({"system": None}, "system is missing"),
        ({"redirect_uri": "http://af.example.com/cb"}, "uses plain http"),
        ({"redirect_uri": "http://10.0.0.5/cb"}, "uses plain http"),
        ({"redirect_uri": "https://af.example.com/cb#frag"}, "fragment"),
        ({"redirect_uri": "/papertrail/callback"}, "absolute http(s) URL"),
        ({"redirect_uri": "ftp://af.example.com/cb"}, "absolute http(s) URL"),
        ({"client_auth_method": "private_key_jwt"}, "client_auth_method 'private_key_jwt' is not supported"),
        ({"token_url": "http://tokens.example.com/token"}, "token_url"),
        ({"base_url": "http://www.papertrail-ai.com"}, "base URL (host)"),
        ({"issuer": "http://issuer.example.com"}, "issuer"),
        ({"timeout": 0}, "timeout must be between"),
        ({"leeway": -1}, "leeway must be between"),
    ],
)
def test_invalid_configuration_is_refused_with_a_clear_message(changes, fragment):
    config = OAuthClientConfig(**{**GOOD, **changes})
    with pytest.raises(PapertrailConfigurationError) as err:
        config.validate(conn_id="pt")
    assert fragment in str(err.value)
    assert "'pt'" in str(err.value)
    assert "secret-value" not in str(err.value)


def test_all_problems_are_reported_at_once():
    problems = OAuthClientConfig(client_id="", client_secret="", redirect_uri="http://x.example.com/").problems()
    assert len(problems) == 4


@pytest.mark.parametrize(
    "uri",
    [
        "https://af.example.com/papertrail/callback",
        "http://127.0.0.1:8080/papertrail/callback",
        "http://localhost:8080/papertrail/callback",
        "http://[::1]:8080/papertrail/callback",
        "http://127.5.6.7/cb",
    ],
)
def test_valid_redirect_uris(uri):
    assert OAuthClientConfig(**{**GOOD, "redirect_uri": uri}).problems() == []


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("LOCALHOST", True),
        ("localhost.evil.com", False),
        ("10.1.2.3", False),
        (None, False),
    ],
)
def test_loopback_detection(host, loopback):
    assert is_loopback_host(host) is loopback


def test_redirect_uri_not_needed_for_data_calls():
    assert OAuthClientConfig(client_id="a", client_secret="b").problems(need_redirect_uri=False) == []


def test_endpoints_default_to_documented_urls_and_can_be_overridden():
    config = OAuthClientConfig(**GOOD)
    assert config.effective_authorize_url == "https://www.papertrail-ai.com/api/authorize.php"
    assert config.effective_token_url == "https://www.papertrail-ai.com/api/token.php"
    assert config.effective_api_url == "https://www.papertrail-ai.com/api"
    moved = OAuthClientConfig(**GOOD, base_url="https://pt.example.com/", token_url="https://t.example.com/tok")
    assert moved.effective_authorize_url == "https://pt.example.com/api/authorize.php"
    assert moved.effective_token_url == "https://t.example.com/tok"


def test_tls_is_always_verified():
    assert OAuthClientConfig(**GOOD).verify is True
    assert OAuthClientConfig(**GOOD, ca_bundle="/etc/ca.pem").verify == "/etc/ca.pem"


def test_repr_hides_the_secret():
    assert "secret-value" not in repr(OAuthClientConfig(**GOOD))


def test_unknown_system_is_a_warning_not_an_error():
    assert system_warnings("xero") == ()
    assert "wave" in system_warnings("wave")[0]
    assert OAuthClientConfig(**{**GOOD, "system": "wave"}).problems() == []


def test_redirect_uri_with_a_trailing_slash_is_refused():
    from airflow_papertrail.oauth import OAuthClientConfig

    config = OAuthClientConfig(
        client_id="c", client_secret="s" * 12, redirect_uri="https://a.example.com/papertrail/callback/", system="xero"
    )
    problems = " ".join(config.problems())
    assert "ends with a slash" in problems and "'/papertrail/callback'" in problems
    ok = OAuthClientConfig(
        client_id="c", client_secret="s" * 12, redirect_uri="https://a.example.com/papertrail/callback", system="xero"
    )
    assert ok.problems() == []
