"""The papertrail_grant_health example DAG in one real ``dag.test()`` run (metadata DB, encrypted
grants in Variables, the emulator): an idle grant is refreshed, a revoked one is notified through
the DAG's notifier with the Connect link, and the task fails naming it.

One run only: each ``dag.test()`` costs about 8 s of start-up. What the run's outcome implies for
later runs (no second alert, a new alert after a reconnect) is tests/unit/test_keepalive.py's."""

from __future__ import annotations

import json
import sys
import time

import pytest
from cryptography.fernet import Fernet

from airflow_papertrail.health import REAUTHORIZATION_REQUIRED, VALID, health_variable_key, read_health
from airflow_papertrail.keepalive import DAY, DEAD, alert_variable_key
from airflow_papertrail.oauth import OAuthClient, OAuthClientConfig
from airflow_papertrail.oauth.envelope import TokenCipher
from airflow_papertrail.token_store import OrmVariables, VariableTokenStore
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, remember_secrets
from tests.integration.conftest import REPO, airflow_env, run
from tests.integration.test_data_operators import RUNNER, _no_secret

pytestmark = pytest.mark.integration

DAG_FILE = str(REPO / "dags" / "papertrail_grant_health.py")
ALIVE, REVOKED, FRESH = "pt_health_alive_it", "pt_health_revoked_it", "pt_health_fresh_it"
SCOPE = "accounting.read accounting.write"


def _connect_all(emulator, key: str, conn_ids: list[str], *, idle_days: dict[str, float]) -> dict[str, str]:
    """A real consent per connection, stored encrypted with ``key``; health aged by ``idle_days``."""
    config = OAuthClientConfig(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        scope=SCOPE,
        system="xero",
        base_url=emulator.base_url,
    )
    backend = OrmVariables()
    env = {"AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS": key, "AIRFLOW__PAPERTRAIL__REFRESH_COORDINATOR": "local"}
    for conn_id in conn_ids:
        code = emulator.issue_code(client_id=CLIENT_ID, redirect_uri=REDIRECT_URI, scope=SCOPE, system="xero")
        token = OAuthClient(config).exchange_code(code)
        remember_secrets(code, token.access_token, token.refresh_token)
        VariableTokenStore(conn_id, cipher=TokenCipher([key]), backend=backend).save(token)
        # Consented (and last refreshed) that many days ago, as far as the keep-alive can tell.
        health = json.loads(backend.get(health_variable_key(conn_id)) or "{}")
        health["authorized_at"] = time.time() - idle_days.get(conn_id, 0) * DAY
        backend.set(health_variable_key(conn_id), json.dumps(health))
        backend.delete(alert_variable_key(conn_id))
        env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(
            {
                "conn_type": "papertrail",
                "login": CLIENT_ID,
                "password": CLIENT_SECRET,
                "host": emulator.base_url,
                "extra": {"redirect_uri": REDIRECT_URI, "system": "xero", "scope": SCOPE},
            }
        )
    return airflow_env(**env)


def test_example_dag_refreshes_idle_grants_and_alerts_on_a_revoked_one(airflow_db, emulator, monkeypatch):
    key = Fernet.generate_key().decode()
    remember_secrets(key)
    monkeypatch.setenv("AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS", key)
    env = _connect_all(emulator, key, [ALIVE, REVOKED, FRESH], idle_days={ALIVE: 8, REVOKED: 8, FRESH: 1})
    revoked = VariableTokenStore(REVOKED, cipher=TokenCipher([key]), backend=OrmVariables()).load()
    assert revoked is not None and revoked.token.refresh_token
    assert emulator.revoke_grant(revoked.token.refresh_token)

    conf = {"conn_ids": f"{ALIVE}, {REVOKED}, {FRESH}"}
    proc = run(
        [sys.executable, RUNNER, DAG_FILE, "papertrail_grant_health", json.dumps(conf)],
        env=env,
        timeout=600,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert "DAGRUN_STATE=failed" in proc.stdout, out[-6000:]

    # The idle grant was refreshed through the ordinary path, the fresh one left alone, the revoked
    # one refused once (then not presented again).
    assert emulator.stats["refresh_grants"] == 1
    assert emulator.stats["invalid_grant_errors"] == 1
    backend = OrmVariables()
    alive = read_health(ALIVE, backend=backend)
    assert alive.state == VALID and alive.last_refresh_at is not None and time.time() - alive.last_refresh_at < 600
    assert read_health(FRESH, backend=backend).last_refresh_at is None
    assert read_health(REVOKED, backend=backend).state == REAUTHORIZATION_REQUIRED

    # The DAG's notifier rendered its template with the grant's context: once, for the dead grant only.
    alerts = [line for line in out.splitlines() if "PAPERTRAIL ALERT:" in line]
    assert len(alerts) == 1, alerts
    assert f"connection {REVOKED}: {DEAD} (invalid_grant: the grant has been revoked)" in alerts[0]
    assert f"/papertrail/connections#conn-{REVOKED}" in alerts[0]
    # The task failed after notifying, naming the grant and the Connect page.
    assert "GrantsNeedReauthorization" in out
    assert f"Papertrail-ai grants need re-authorization: '{REVOKED}'" in out
    memory = json.loads(backend.get(alert_variable_key(REVOKED)) or "{}")
    assert memory["notified"]["attention"] == DEAD
    assert backend.get(alert_variable_key(ALIVE)) is None  # never needed attention: nothing written
    _no_secret(emulator, proc.stdout, proc.stderr)
