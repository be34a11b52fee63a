"""The encrypted token store through real Airflow Variables (metadata DB + dag.test())."""

from __future__ import annotations

import json
import os
import sqlite3
import sys

import pytest
from cryptography.fernet import Fernet

from airflow_papertrail.oauth.envelope import TokenCipher
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI
from tests.integration.conftest import BIN, REPO, airflow_env, run

pytestmark = pytest.mark.integration

DAG_FILE = str(REPO / "tests" / "integration" / "dags" / "papertrail_token_store_it.py")
VARIABLE = "papertrail_grant__papertrail_it"


def _conn_env(emulator) -> str:
    return json.dumps(
        {
            "conn_type": "papertrail",
            "login": CLIENT_ID,
            "password": CLIENT_SECRET,
            "host": emulator.base_url,
            "extra": {"redirect_uri": REDIRECT_URI, "system": "xero", "scope": "accounting.read"},
        }
    )


def _dag_test(mode: str, emulator, keys: list[str], code: str = "", check: bool = True):
    env = airflow_env(
        AIRFLOW_CONN_PAPERTRAIL_IT=_conn_env(emulator),
        AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS=",".join(keys),
        PT_IT_CODE=code,
    )
    return run([sys.executable, DAG_FILE, mode], env=env, timeout=300, check=check)


def _raw_variable(home, *, cli: bool = False) -> str:
    """The Variable's value as a person with Variable access sees it, after Airflow's own
    [core] fernet_key layer is removed (through ``airflow variables get`` when ``cli``, else with
    the key directly: each CLI start costs about 10 s of CI); plus the DB column."""
    with sqlite3.connect(home / "airflow.db") as db:
        row = db.execute("select val, is_encrypted from variable where key = ?", (VARIABLE,)).fetchone()
    assert row is not None, "the grant Variable was not written"
    if cli:
        value = run([str(BIN / "airflow"), "variables", "get", VARIABLE], timeout=120).stdout.strip().splitlines()[-1]
    else:
        from cryptography.fernet import MultiFernet

        # the [core] fernet_key the dag.test() processes got (airflow_env copies os.environ)
        fernet = MultiFernet([Fernet(k) for k in os.environ["AIRFLOW__CORE__FERNET_KEY"].split(",")])
        value = fernet.decrypt(row[0].encode()).decode() if row[1] else row[0]
    return value + "\n" + row[0]


def test_exchange_refresh_rotate_through_real_variables(airflow_db, emulator):
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    code = emulator.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT_URI, scope="accounting.read", system="xero")

    proc = _dag_test("exchange", emulator, [old_key], code)
    assert "DAGRUN_STATE=success" in proc.stdout
    assert emulator.stats["authorization_code_grants"] == 1 and emulator.stats["refresh_grants"] == 1

    raw_and_db = _raw_variable(airflow_db, cli=True)
    raw = raw_and_db.splitlines()[0]
    secrets = [s for s in emulator.issued_secrets if s != code]
    assert secrets, "the emulator issued no tokens"
    for value in [*secrets, code, CLIENT_SECRET]:
        assert value not in raw_and_db, "a token or secret reached the Variable in plaintext"
    envelope = json.loads(raw)
    payload = TokenCipher([old_key]).open("grant", "papertrail_it", raw)
    assert payload["generation"] == 2
    stored = payload["token"]
    # the stored grant is exactly the emulator's current one: the rotated refresh token works,
    # and the first refresh token was replaced
    assert stored["access_token"] in emulator.issued_secrets
    assert emulator.grant_is_active(stored["refresh_token"])
    assert envelope["conn_id"] == "papertrail_it"

    # test_connection inside a task: credentials accepted, grant reported, no token spent
    assert "credentials accepted" in proc.stdout and "valid until" in proc.stdout
    assert emulator.stats["refresh_grants"] == 1

    # rotate: new key first, old key still listed -> re-encrypted under the new key
    proc = _dag_test("rotate", emulator, [new_key, old_key])
    assert "DAGRUN_STATE=success" in proc.stdout
    rotated = _raw_variable(airflow_db).splitlines()[0]
    assert rotated != raw
    assert TokenCipher([new_key]).open("grant", "papertrail_it", rotated)["token"] == stored

    # the new key alone reads it in a task
    assert "DAGRUN_STATE=success" in _dag_test("read", emulator, [new_key]).stdout

    # the retired key alone cannot: clear error naming the Variable, value untouched
    proc = _dag_test("read", emulator, [old_key], check=False)
    assert proc.returncode != 0
    assert "cannot be decrypted" in proc.stdout + proc.stderr and VARIABLE in proc.stdout + proc.stderr
    assert _raw_variable(airflow_db).splitlines()[0] == rotated

    # no key at all: refuses, says how to fix it
    proc = _dag_test("read", emulator, [], check=False)
    assert proc.returncode != 0 and "token_encryption_keys" in proc.stdout + proc.stderr
