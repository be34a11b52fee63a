from __future__ import annotations

import json

import pytest
from cryptography.fernet import Fernet

from airflow_papertrail.exceptions import PapertrailConfigurationError
from airflow_papertrail.hooks.papertrail import PapertrailHook, config_from_connection
from airflow_papertrail.oauth import Token
from airflow_papertrail.oauth.envelope import TokenCipher
from airflow_papertrail.token_store import VariableTokenStore
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, emulator_connection
from tests.unit.test_token_store import MemoryVariables


def _set_conn(monkeypatch, conn_id="papertrail_default", **fields):
    extra = fields.pop("extra", {})
    conn = {"conn_type": "papertrail", "login": CLIENT_ID, "password": CLIENT_SECRET, **fields, "extra": extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))


def test_hook_identity_and_cheap_constructor(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_PAPERTRAIL_DEFAULT", raising=False)
    hook = PapertrailHook()  # no connection exists: the constructor must not look
    assert hook.papertrail_conn_id == "papertrail_default"
    assert (PapertrailHook.conn_type, PapertrailHook.conn_name_attr, PapertrailHook.hook_name) == (
        "papertrail",
        "papertrail_conn_id",
        "Papertrail-ai",
    )


def test_connection_mapping(monkeypatch):
    _set_conn(
        monkeypatch,
        host="https://pt.example.com",
        extra={
            "redirect_uri": REDIRECT_URI,
            "scope": "a, b  c",
            "system": "quickbooks",
            "token_url": "https://t.example.com/token",
            "client_auth_method": "client_secret_basic",
            "use_pkce": "false",
            "issuer": "https://pt.example.com",
            "ca_bundle": "/etc/ssl/ca.pem",
            "timeout": "12",
            "leeway": 300,
        },
    )
    config = PapertrailHook().config
    assert (config.client_id, config.client_secret) == (CLIENT_ID, CLIENT_SECRET)
    assert config.base_url == "https://pt.example.com"
    assert config.effective_authorize_url == "https://pt.example.com/api/authorize.php"
    assert config.effective_token_url == "https://t.example.com/token"
    assert config.scope == "a b c"
    assert config.system == "quickbooks"
    assert config.client_auth_method == "client_secret_basic"
    assert config.use_pkce is False
    assert config.verify == "/etc/ssl/ca.pem"
    assert (config.timeout, config.leeway) == (12.0, 300.0)


def test_defaults(monkeypatch):
    _set_conn(monkeypatch)
    config = PapertrailHook().config
    assert config.base_url == "https://www.papertrail-ai.com"
    assert config.use_pkce is True
    assert config.client_auth_method == "client_secret_post"
    assert (config.timeout, config.leeway) == (30.0, 120.0)


def test_prefixed_extras_from_older_forms(monkeypatch):
    _set_conn(monkeypatch, extra={"extra__papertrail__system": "xero", "extra__papertrail__redirect_uri": REDIRECT_URI})
    config = PapertrailHook().config
    assert (config.system, config.redirect_uri) == ("xero", REDIRECT_URI)


def test_host_without_scheme_gets_https(monkeypatch):
    _set_conn(monkeypatch, host="pt.example.com")
    assert PapertrailHook().config.base_url == "https://pt.example.com"


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"login": ""}, "client ID is missing"),
        ({"password": ""}, "client secret is missing"),
        ({"extra": {"client_auth_method": "tls_client_auth"}}, "not supported"),
        ({"extra": {"use_pkce": "maybe"}}, "use_pkce"),
        ({"extra": {"timeout": "soon"}}, "timeout"),
        ({"extra": {"redirect_uri": "http://airflow.example.com/cb"}}, "plain http"),
    ],
)
def test_invalid_connections_raise_clear_errors(monkeypatch, fields, fragment):
    _set_conn(monkeypatch, conn_id="pt_bad", **fields)
    with pytest.raises(PapertrailConfigurationError, match=fragment) as err:
        PapertrailHook("pt_bad").config
    assert CLIENT_SECRET not in str(err.value)


def test_unknown_system_warns(monkeypatch, capsys, caplog):
    _set_conn(monkeypatch, extra={"system": "wave"})
    assert PapertrailHook().config.system == "wave"
    # Airflow's hook logger is structlog: it may print instead of going through logging
    assert "not one of the documented systems" in capsys.readouterr().out + caplog.text


def _hook_with_store(monkeypatch, emulator, grant: Token | None):
    _set_conn(monkeypatch, host=emulator.base_url, extra={"redirect_uri": REDIRECT_URI, "system": "xero"})
    hook = PapertrailHook()
    store = VariableTokenStore(
        "papertrail_default", cipher=TokenCipher([Fernet.generate_key().decode()]), backend=MemoryVariables()
    )
    if grant is not None:
        store.save(grant)
    hook.token_store = store
    return hook


def test_test_connection_reports_credentials_and_grant(monkeypatch, emulator):
    ok, message = _hook_with_store(monkeypatch, emulator, None).test_connection()
    assert ok, message
    assert "credentials accepted" in message and "none yet" in message
    assert emulator.stats["authorization_code_grants"] == 0

    now = __import__("time").time()
    valid = Token(
        access_token="a" * 20, token_type="Bearer", obtained_at=now, expires_at=now + 600, refresh_token="r" * 20
    )
    ok, message = _hook_with_store(monkeypatch, emulator, valid).test_connection()
    assert ok and "valid until" in message

    expired = Token(
        access_token="a" * 20,
        token_type="Bearer",
        obtained_at=now - 7200,
        expires_at=now - 3600,
        refresh_token="r" * 20,
    )
    ok, message = _hook_with_store(monkeypatch, emulator, expired).test_connection()
    assert ok and "will be refreshed" in message
    assert emulator.stats["refresh_grants"] == 0  # reporting never spends the refresh token


def test_test_connection_rejected_client(monkeypatch, emulator):
    hook = _hook_with_store(monkeypatch, emulator, None)
    monkeypatch.setenv(
        "AIRFLOW_CONN_PAPERTRAIL_DEFAULT", emulator_connection(emulator.base_url, password="not-the-secret")
    )
    ok, message = hook.test_connection()
    assert not ok and "client rejected" in message and "not-the-secret" not in message


def test_test_connection_never_raises_on_bad_config(monkeypatch):
    _set_conn(monkeypatch, conn_id="pt_cfg", extra={"redirect_uri": "http://example.com/cb"})
    ok, message = PapertrailHook("pt_cfg").test_connection()
    assert not ok and "plain http" in message


def test_test_connection_missing_connection(monkeypatch):
    monkeypatch.delenv("_AIRFLOW_PROCESS_CONTEXT", raising=False)
    ok, message = PapertrailHook("does_not_exist").test_connection()
    assert not ok and "does_not_exist" in message
    # Airflow's own text is kept (it was reduced to the type name), and the plain-shell case explained.
    assert "AirflowNotFoundException: The conn_id `does_not_exist` isn't defined" in message
    assert "Outside a running task" in message and "airflow connections test" in message


def test_test_connection_prints_its_message_in_the_connections_test_cli(monkeypatch, emulator, capsys):
    hook = _hook_with_store(monkeypatch, emulator, None)
    monkeypatch.setattr("sys.argv", ["/venv/bin/airflow", "connections", "test", "papertrail_default"])
    ok, message = hook.test_connection()
    assert ok
    assert f"Papertrail-ai connection 'papertrail_default': {message}" in capsys.readouterr().out

    monkeypatch.setattr("sys.argv", ["/venv/bin/airflow", "tasks", "test", "x"])
    hook.test_connection()
    assert "credentials accepted" not in capsys.readouterr().out  # elsewhere: only the log and the return value


def test_invalid_extra_json(monkeypatch):
    from types import SimpleNamespace

    conn = SimpleNamespace(conn_id="x", login="a", password="b", host=None, port=None, extra="{not json")
    with pytest.raises(PapertrailConfigurationError, match="not valid JSON"):
        config_from_connection(conn)
