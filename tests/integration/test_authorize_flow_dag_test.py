"""The authorization flow with real parts in one process tree: the example DAG under
``dag.test()`` (real metadata DB, triggers run inline), the emulator's consent page driven
over HTTP, and the callback delivered to the real plugin app writing through the ORM."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from cryptography.fernet import Fernet
from fastapi.testclient import TestClient

from airflow_papertrail.authorization import AuthorizationStore, authorization_id_for, pending_variable_key
from airflow_papertrail.oauth.envelope import TokenCipher
from airflow_papertrail.plugins.callback_app import create_app
from airflow_papertrail.token_store import OrmVariables, VariableTokenStore
from tests.conftest import CLIENT_ID, CLIENT_SECRET, REDIRECT_URI, append_captured, remember_secrets
from tests.integration.conftest import REPO, airflow_env
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

RUNNER = str(REPO / "tests" / "integration" / "dags" / "run_dag.py")
EXAMPLE = str(REPO / "dags" / "papertrail_authorize.py")
POKE = str(REPO / "tests" / "integration" / "dags" / "papertrail_authorize_poke_it.py")


def _xcom_rows(home, dag_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(home / "airflow.db", timeout=30) as db:
        try:
            return db.execute(
                "select run_id, value from xcom where dag_id = ? and task_id = 'authorize' and key = 'return_value'",
                (dag_id,),
            ).fetchall()
        except sqlite3.OperationalError:
            return []


def _consent_url(home, dag_id: str, deadline: float, proc, seen_runs: set[str]) -> str:
    """Wait for the authorize task's XCom (what a person would copy from the UI)."""

    def consent_url() -> str | None:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"DAG ended before asking for consent:\n{out[-3000:]}\n{err[-3000:]}")
        rows = [value for run_id, value in _xcom_rows(home, dag_id) if run_id not in seen_runs]
        if not rows:
            return None
        value = json.loads(rows[0])
        if isinstance(value, str):
            value = json.loads(value)
        return str(value["consent_url"])

    return wait_until(consent_url, timeout=max(0.0, deadline - time.monotonic()), message="no consent URL in XCom")


def _remember_verifier(url: str, key: str) -> str:
    """Read back the pending authorization the authorize task stored (the state in the consent URL
    names it), give its PKCE verifier to the log canary, and return the Variable's name."""
    state = parse_qs(urlsplit(url).query)["state"][0]
    authorization_id = authorization_id_for(state)
    pending = AuthorizationStore(cipher=TokenCipher([key]), backend=OrmVariables()).load(authorization_id)
    assert pending is not None and pending.state == state
    assert pending.code_verifier  # PKCE is on by default
    remember_secrets(pending.code_verifier)
    return pending_variable_key(authorization_id)


def _consent(emulator, url: str, decision: str) -> str:
    """What the browser does: load the consent page, submit the decision, return the redirect."""
    page = requests.get(url, timeout=10)
    assert page.status_code == 200 and "Allow" in page.text
    q = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    answer = requests.post(emulator.authorize_url, data={**q, "decision": decision}, allow_redirects=False, timeout=10)
    assert answer.status_code in (302, 303)
    return answer.headers["Location"]


def _run(emulator, monkeypatch, dag_file, dag_id, decision, key):
    conn = {
        "conn_type": "papertrail",
        "login": CLIENT_ID,
        "password": CLIENT_SECRET,
        "host": emulator.base_url,
        "extra": {
            "redirect_uri": REDIRECT_URI,
            "system": "xero",
            "scope": "accounting.read",
            "issuer": emulator.base_url,
        },
    }
    notify_file = Path(os.environ["AIRFLOW_HOME"]) / f"notify-{dag_id}.txt"
    notify_file.unlink(missing_ok=True)
    env = airflow_env(
        AIRFLOW_CONN_PAPERTRAIL_IT=json.dumps(conn),
        AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS=key,
        PT_IT_NOTIFY_FILE=str(notify_file),
    )
    monkeypatch.setenv("AIRFLOW__PAPERTRAIL__TOKEN_ENCRYPTION_KEYS", key)
    home = Path(os.environ["AIRFLOW_HOME"])
    seen_runs = {run_id for run_id, _ in _xcom_rows(home, dag_id)}
    proc = subprocess.Popen(
        [sys.executable, RUNNER, dag_file, dag_id, json.dumps({"conn_id": "papertrail_it"})],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        url = _consent_url(home, dag_id, time.monotonic() + 120, proc, seen_runs)
        pending_key = _remember_verifier(url, key)
        redirect = _consent(emulator, url, decision)
        assert redirect.startswith(REDIRECT_URI)
        callback = TestClient(create_app())  # the real plugin app: ORM + row lock on this DB
        parts = urlsplit(redirect)
        delivered = time.monotonic()
        response = callback.get(f"/callback?{parts.query}")
        replay = callback.get(f"/callback?{parts.query}")
        out, err = proc.communicate(timeout=180)
        notified = notify_file.read_text() if notify_file.exists() else None
        if dag_id == "papertrail_authorize_poke_it":
            assert notified is not None and notified.startswith(f"Approve: {url} until ")  # the notifier got the link
        return proc.returncode, out + err, response, replay, time.monotonic() - delivered, pending_key
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read() if proc.stdout and not proc.stdout.closed else ""
        append_captured(out)


@pytest.mark.parametrize(
    ("dag_file", "dag_id"), [(EXAMPLE, "papertrail_authorize"), (POKE, "papertrail_authorize_poke_it")]
)
def test_allow_stores_an_encrypted_grant(airflow_db, emulator, monkeypatch, dag_file, dag_id):
    key = Fernet.generate_key().decode()
    rc, output, response, replay, _, pending_key = _run(emulator, monkeypatch, dag_file, dag_id, "allow", key)
    append_captured(output)
    assert response.status_code == 200 and "Authorization received" in response.text
    assert replay.status_code in (400, 409)  # the second delivery changes nothing
    assert rc == 0, output[-4000:]
    assert "DAGRUN_STATE=" in output and "success" in output
    assert emulator.stats["authorization_code_grants"] == 1
    grant = VariableTokenStore("papertrail_it", cipher=TokenCipher([key]), backend=OrmVariables()).load()
    assert grant is not None
    assert grant.token.access_token in emulator.issued_secrets
    assert emulator.grant_is_active(grant.token.refresh_token)
    for secret in emulator.issued_secrets:
        assert secret not in output
    # the pending entry and its captured code are gone
    assert OrmVariables().get(pending_key) is None


def test_deny_fails_the_sensor_with_the_reason(airflow_db, emulator, monkeypatch):
    key = Fernet.generate_key().decode()
    rc, output, response, _, elapsed, pending_key = _run(
        emulator, monkeypatch, EXAMPLE, "papertrail_authorize", "deny", key
    )
    append_captured(output)
    assert response.status_code == 200 and "Access not granted" in response.text
    assert rc != 0
    assert "access was denied" in output
    assert emulator.stats["authorization_code_grants"] == 0
    assert OrmVariables().get(pending_key) is None  # the denied authorization's entry is deleted
