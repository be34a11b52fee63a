"""Token store logic with an in-memory Variable backend (the real-Variables proof is in
tests/integration/test_token_store_airflow.py)."""

from __future__ import annotations

import json

import pytest
from cryptography.fernet import Fernet

from airflow_papertrail.exceptions import EncryptionKeyMissing, TokenDecryptionError, TokenWriteVerificationError
from airflow_papertrail.oauth import Token
from airflow_papertrail.oauth.envelope import TokenCipher, parse_keys
from airflow_papertrail.token_store import VariableTokenStore, grant_variable_key, load_cipher

NOW = 1_700_000_000.0
TOKEN = Token.from_response(
    {
        "access_token": "ACCESS-abcdefghijklmnop",
        "refresh_token": "REFRESH-abcdefghijklmnop",
        "expires_in": 3600,
        "scope": "s",
    },
    now=NOW,
)


class MemoryVariables:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.descriptions: dict[str, str | None] = {}

    def get(self, key):
        return self.values.get(key)

    def set(self, key, value, description=None):
        self.values[key] = value
        self.descriptions[key] = description

    def delete(self, key):
        self.values.pop(key, None)


class LossyVariables(MemoryVariables):
    """Variable.set that logs an API error and carries on (apache/airflow#68537)."""

    def set(self, key, value, description=None):
        return None


def _store(keys, backend=None, conn_id="pt_conn"):
    return VariableTokenStore(
        conn_id, cipher=TokenCipher(keys), backend=backend or MemoryVariables(), clock=lambda: NOW
    )


def test_round_trip_and_no_plaintext_at_rest():
    key = Fernet.generate_key().decode()
    store = _store([key])
    first = store.save(TOKEN)
    raw = store.backend.values[grant_variable_key("pt_conn")]
    assert "ACCESS-" not in raw and "REFRESH-" not in raw and "abcdefghijklmnop" not in raw
    envelope = json.loads(raw)
    assert envelope["v"] == 1 and envelope["conn_id"] == "pt_conn" and envelope["kind"] == "grant"
    loaded = store.load()
    assert loaded.token == TOKEN and loaded.generation == 1 == first.generation
    second = store.save(TOKEN, based_on=loaded)
    assert second.generation == 2 and store.load().generation == 2
    assert "do not edit" in store.backend.descriptions[store.key]


def test_variable_name_is_documented_form():
    assert grant_variable_key("papertrail_default") == "papertrail_grant__papertrail_default"


def test_missing_value_is_none():
    assert _store([Fernet.generate_key().decode()]).load() is None


def test_envelopes_cannot_be_swapped_between_connections():
    key = Fernet.generate_key().decode()
    backend = MemoryVariables()
    a, b = _store([key], backend, "conn_a"), _store([key], backend, "conn_b")
    a.save(TOKEN)
    backend.values[b.key] = backend.values[a.key]
    with pytest.raises(TokenDecryptionError, match="belongs to connection"):
        b.load()
    # even with the outer label rewritten, the inner binding refuses it
    forged = json.loads(backend.values[a.key])
    forged["conn_id"] = "conn_b"
    backend.values[b.key] = json.dumps(forged)
    before = backend.values[b.key]
    with pytest.raises(TokenDecryptionError, match="conn_a"):
        b.load()
    assert backend.values[b.key] == before  # left untouched


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("not json", "not an encrypted envelope"),
        ('{"v": 9, "ciphertext": "x"}', "unknown envelope format"),
        ('{"v": 1, "ciphertext": "gAAAAAgarbage"}', "cannot be decrypted"),
        ("[1, 2]", "unknown envelope format"),
    ],
)
def test_corrupted_values_raise_clear_errors_and_stay_untouched(raw, fragment):
    store = _store([Fernet.generate_key().decode()])
    store.backend.values[store.key] = raw
    with pytest.raises(TokenDecryptionError) as err:
        store.load()
    assert (fragment in str(err.value) and "pt_conn" in str(err.value)) or store.key in str(err.value)
    assert store.backend.values[store.key] == raw


def test_wrong_key_names_the_connection_and_leaves_value():
    backend = MemoryVariables()
    _store([Fernet.generate_key().decode()], backend).save(TOKEN)
    raw = backend.values["papertrail_grant__pt_conn"]
    with pytest.raises(TokenDecryptionError, match="papertrail_grant__pt_conn"):
        _store([Fernet.generate_key().decode()], backend).load()
    assert backend.values["papertrail_grant__pt_conn"] == raw


def test_key_rotation_with_multifernet():
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    backend = MemoryVariables()
    _store([old], backend).save(TOKEN)
    both = _store([new, old], backend)
    assert both.load().token == TOKEN  # old ciphertext still readable
    assert both.rotate_keys() is True
    assert _store([new], backend).load().token == TOKEN  # re-encrypted under the new key
    with pytest.raises(TokenDecryptionError):
        _store([old], backend).load()


def test_lost_write_is_detected():
    store = _store([Fernet.generate_key().decode()], LossyVariables())
    with pytest.raises(TokenWriteVerificationError) as err:
        store.save(TOKEN)
    assert "pt_conn" in str(err.value) and "ACCESS" not in str(err.value)


def test_failing_write_is_reported_without_secrets():
    class Broken(MemoryVariables):
        def set(self, key, value, description=None):
            raise RuntimeError(f"server said no to {value}")

    with pytest.raises(TokenWriteVerificationError) as err:
        _store([Fernet.generate_key().decode()], Broken()).save(TOKEN)
    assert "gAAAA" not in str(err.value) and "RuntimeError" in str(err.value)


@pytest.mark.parametrize("raw", [None, "", " , "])
def test_no_key_is_a_clear_error(monkeypatch, raw):
    if raw is None:
        monkeypatch.delenv("AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS", raising=False)
    else:
        monkeypatch.setenv("AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS", raw)
    with pytest.raises(EncryptionKeyMissing, match="never stored in plaintext"):
        load_cipher()


def test_invalid_key_is_a_clear_error():
    with pytest.raises(EncryptionKeyMissing, match="entry #2 is not a valid Fernet key"):
        TokenCipher([Fernet.generate_key().decode(), "short"])


def test_keys_come_from_airflow_config_env(fernet_key):
    assert load_cipher().key_count == 1
    assert parse_keys(f" {fernet_key} ,\n other ") == [fernet_key, "other"]


def test_store_never_writes_without_a_key(monkeypatch):
    monkeypatch.delenv("AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS", raising=False)
    backend = MemoryVariables()
    store = VariableTokenStore("pt_conn", backend=backend)
    with pytest.raises(EncryptionKeyMissing):
        store.save(TOKEN)
    assert backend.values == {}
